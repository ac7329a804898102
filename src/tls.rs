//! TLS on the client port: the rustls server configuration built from `tls_cert_file`,
//! `tls_key_file` and `tls_client_ca_file`, and what a finished handshake says about the
//! peer.
//!
//! No sockets here: rustls's [`ServerConnection`] is sans-I/O, and the reactor feeds it
//! bytes. Files are read only by [`server_config`], at start-up and on HUP, as `user`
//! once privileges are dropped; symbolic links are followed, since certbot's `live/`
//! files are links into `archive/`. Only the ring provider is used, as lettre's: one
//! crypto library in the binary.
//!
//! Client certificates (`tls_client_ca_file`): a client without one is served,
//! untrusted; a client presenting one signed by that CA is trusted ([`peer_trusted`]);
//! a client presenting any other certificate is *refused*: the handshake fails with a
//! `bad_certificate` or `unknown_ca` alert, so it never reaches the protocol. Refusing
//! tells the client at once that its certificate is wrong, where serving it untrusted
//! would surface later as a puzzling `-ERR` on PUB.

use crate::config::Config;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{Error as RustlsError, InconsistentKeys, RootCertStore, ServerConfig, ServerConnection};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The ALPN protocol name offered. A client that offers no ALPN is served all the same;
/// one that offers only other names is refused with `no_application_protocol`, as
/// RFC 7301 asks.
pub const ALPN: &[u8] = b"notifd/1";

/// A certificate, key or CA file that cannot be used: `KEY PATH: what`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// The configuration key that names the file.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub msg: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.key, self.path.display(), self.msg)
    }
}

impl std::error::Error for TlsError {}

/// The server configuration for `cfg`, or `None` when `tls_cert_file` is not set (no
/// TLS port). Reads the files now: call it at start-up and again on HUP. Each
/// [`ServerConnection`] holds its own `Arc` of the configuration it started with, so a
/// reload's new certificate serves new connections while open ones go on; on an error
/// the running configuration is simply kept.
pub fn from_config(cfg: &Config) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) else {
        // Config::parse refuses one without the other.
        return Ok(None);
    };
    server_config(cert, key, cfg.tls_client_ca_file.as_deref()).map(Some)
}

/// For `notifd -t`: the files load and the key matches the certificate.
pub fn check(cfg: &Config) -> Result<(), String> {
    from_config(cfg).map(|_| ()).map_err(|e| e.to_string())
}

/// Loads the PEM chain `cert_file` (leaf first) and the PEM key `key_file` into a
/// configuration with TLS 1.2 and 1.3 only, ALPN [`ALPN`] offered, and, with
/// `client_ca_file`, optional client certificates verified against that CA.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = certified_key(cert_file, key_file, &provider)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = match client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let fail = |msg: String| TlsError { key: "tls_client_ca_file", path: ca_file.into(), msg };
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca_file).map_err(fail)? {
                roots.add(cert).map_err(|e| fail(format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| fail(format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The chain and its key, checked to belong together, each error blaming its file.
fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_err = |msg: String| TlsError { key: "tls_cert_file", path: cert_file.into(), msg };
    let key_err = |msg: String| TlsError { key: "tls_key_file", path: key_file.into(), msg };
    let chain = read_certs(cert_file).map_err(cert_err)?;
    let key = read_key(key_file).map_err(key_err)?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("not a usable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        // Unknown: the key cannot tell its public half; the handshake will show.
        Ok(()) | Err(RustlsError::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(key_err(format!("does not match the certificate of tls_cert_file {}", cert_file.display())))
        }
        Err(e) => Err(cert_err(format!("not a usable certificate: {e}"))),
    }
}

/// Every certificate of a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM file: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it (expected \"-----BEGIN CERTIFICATE-----\")".into());
    }
    Ok(certs)
}

/// The first private key of a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no private key in it (expected \"-----BEGIN PRIVATE KEY-----\")".to_string()
        }
        e => format!("not a PEM file: {e}"),
    })
}

/// After the handshake: the client presented a certificate and it was verified against
/// `tls_client_ca_file`, which makes it trusted (PROTOCOL.md *Trust*). False while the
/// handshake runs, and always false without `tls_client_ca_file` (no certificate is
/// asked for then).
pub fn peer_trusted(conn: &ServerConnection) -> bool {
    // rustls keeps a client's certificates only once its verifier accepted them: an
    // unverified one fails the handshake instead.
    !conn.is_handshaking() && conn.peer_certificates().is_some_and(|chain| !chain.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, ConnectionCommon};
    use std::io::{Read, Write};

    /// A CA and PEM files in a temporary folder: `server.pem`/`server.key` for
    /// `localhost` signed by the CA, `ca.pem`, and client certificates.
    struct Pki {
        dir: tempfile::TempDir,
        ca: rcgen::Certificate,
        ca_key: KeyPair,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().expect("temp dir");
            let ca_key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, "notifd test CA");
            let ca = params.self_signed(&ca_key).expect("CA certificate");
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
            let pki = Pki { dir, ca, ca_key };
            pki.issue("server", "localhost", false, true);
            pki
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// Writes `NAME.pem` and `NAME.key`: a certificate for `subject`, for a client
        /// or a server, signed by the CA or by itself.
        fn issue(&self, name: &str, subject: &str, client: bool, by_ca: bool) {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(vec![subject.to_owned()]).expect("params");
            params.distinguished_name.push(DnType::CommonName, subject);
            params.extended_key_usages = vec![if client {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            }];
            let cert =
                if by_ca { params.signed_by(&key, &self.ca, &self.ca_key) } else { params.self_signed(&key) }
                    .expect("certificate");
            std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write certificate");
            std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).expect("write key");
        }

        fn server(&self, client_ca: bool) -> Result<Arc<ServerConfig>, TlsError> {
            let ca = self.path("ca.pem");
            server_config(&self.path("server.pem"), &self.path("server.key"), client_ca.then_some(&*ca))
        }

        /// A client trusting the CA, with ALPN `alpn` offered, presenting `NAME.pem` if
        /// given.
        fn client(&self, alpn: &[&[u8]], cert: Option<&str>) -> ClientConnection {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.der().clone()).expect("CA root");
            let builder =
                ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(roots);
            let mut config = match cert {
                None => builder.with_no_client_auth(),
                Some(name) => {
                    let chain = read_certs(&self.path(&format!("{name}.pem"))).expect("client chain");
                    let key = read_key(&self.path(&format!("{name}.key"))).expect("client key");
                    builder.with_client_auth_cert(chain, key).expect("client certificate")
                }
            };
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            let name = ServerName::try_from("localhost").expect("server name");
            ClientConnection::new(Arc::new(config), name).expect("client connection")
        }
    }

    /// Hands all that `from` has to send to `to`; whether there was anything. The error
    /// is `to`'s, refusing what it got.
    fn transfer<F, T>(
        from: &mut ConnectionCommon<F>,
        to: &mut ConnectionCommon<T>,
    ) -> Result<bool, RustlsError> {
        let mut moved = false;
        while from.wants_write() {
            let mut bytes = Vec::new();
            from.write_tls(&mut bytes).expect("write_tls to memory");
            moved = true;
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                to.read_tls(&mut rest).expect("read_tls from memory");
                to.process_new_packets()?;
            }
        }
        Ok(moved)
    }

    /// Which side failed the handshake, and why.
    #[derive(Debug)]
    enum Failed {
        Client(RustlsError),
        Server(RustlsError),
    }

    /// Moves bytes both ways by hand until neither side has any to send; a bounded
    /// number of rounds (a handshake takes two or three).
    fn pump(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), Failed> {
        for _ in 0..16 {
            let sent = transfer(client, server).map_err(Failed::Server)?;
            let answered = transfer(server, client).map_err(Failed::Client)?;
            if !sent && !answered {
                return Ok(());
            }
        }
        panic!("the handshake did not settle in 16 rounds");
    }

    fn connect(
        pki: &Pki,
        config: Arc<ServerConfig>,
        alpn: &[&[u8]],
        cert: Option<&str>,
    ) -> Result<(ClientConnection, ServerConnection), Failed> {
        let mut client = pki.client(alpn, cert);
        let mut server = ServerConnection::new(config).expect("server connection");
        pump(&mut client, &mut server)?;
        assert!(!client.is_handshaking() && !server.is_handshaking());
        Ok((client, server))
    }

    #[test]
    fn handshake_alpn_and_bytes_both_ways() {
        let pki = Pki::new();
        let (mut client, mut server) =
            connect(&pki, pki.server(false).unwrap(), &[b"other", ALPN], None).expect("handshake");
        assert_eq!(server.alpn_protocol(), Some(ALPN));
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        let version = server.protocol_version().expect("version");
        assert!(matches!(version, rustls::ProtocolVersion::TLSv1_3 | rustls::ProtocolVersion::TLSv1_2));
        assert!(!peer_trusted(&server), "no client CA: nobody is trusted");

        server.writer().write_all(b"HELLO notifd 1\r\n").unwrap();
        client.writer().write_all(b"PING\r\n").unwrap();
        pump(&mut client, &mut server).expect("data");
        let mut got = [0u8; 64];
        let n = server.reader().read(&mut got).unwrap();
        assert_eq!(&got[..n], b"PING\r\n");
        let n = client.reader().read(&mut got).unwrap();
        assert_eq!(&got[..n], b"HELLO notifd 1\r\n");
    }

    #[test]
    fn alpn_is_not_required() {
        let pki = Pki::new();
        let (_, server) = connect(&pki, pki.server(false).unwrap(), &[], None).expect("handshake");
        assert_eq!(server.alpn_protocol(), None);
        // Only other protocols offered: RFC 7301's alert, documented at ALPN.
        let e = connect(&pki, pki.server(false).unwrap(), &[b"h2"], None).expect_err("refused");
        assert!(matches!(e, Failed::Server(RustlsError::NoApplicationProtocol)), "{e:?}");
    }

    #[test]
    fn tls_1_2_is_served_too() {
        let pki = Pki::new();
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca.der().clone()).unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut server = ServerConnection::new(pki.server(false).unwrap()).unwrap();
        pump(&mut client, &mut server).expect("handshake");
        assert_eq!(server.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    }

    #[test]
    fn a_certificate_for_another_name_fails_on_the_client() {
        let pki = Pki::new();
        pki.issue("server", "notifd.example", false, true);
        let e = connect(&pki, pki.server(false).unwrap(), &[ALPN], None).expect_err("wrong name");
        assert!(matches!(e, Failed::Client(RustlsError::InvalidCertificate(_))), "{e:?}");
    }

    #[test]
    fn client_ca_trusts_signed_serves_anonymous_refuses_unsigned() {
        let pki = Pki::new();
        pki.issue("alice", "alice", true, true);
        pki.issue("mallory", "mallory", true, false);
        let config = pki.server(true).unwrap();

        let (_, server) = connect(&pki, config.clone(), &[ALPN], Some("alice")).expect("signed client");
        assert!(peer_trusted(&server));

        let (_, server) = connect(&pki, config.clone(), &[ALPN], None).expect("client without certificate");
        assert!(!peer_trusted(&server));

        let e = connect(&pki, config, &[ALPN], Some("mallory")).expect_err("self-signed client refused");
        assert!(matches!(e, Failed::Server(RustlsError::InvalidCertificate(_))), "{e:?}");
    }

    #[test]
    fn not_trusted_while_handshaking() {
        let pki = Pki::new();
        let server = ServerConnection::new(pki.server(true).unwrap()).unwrap();
        assert!(!peer_trusted(&server));
    }

    #[test]
    fn mismatched_pair_names_both_files() {
        let pki = Pki::new();
        pki.issue("other", "localhost", false, true);
        let e = server_config(&pki.path("server.pem"), &pki.path("other.key"), None).unwrap_err();
        assert_eq!(e.key, "tls_key_file");
        assert_eq!(
            e.to_string(),
            format!(
                "tls_key_file {}: does not match the certificate of tls_cert_file {}",
                pki.path("other.key").display(),
                pki.path("server.pem").display()
            )
        );
    }

    #[test]
    fn garbage_files_are_named() {
        let pki = Pki::new();
        let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
        let junk = pki.path("junk.pem");
        std::fs::write(&junk, "this is not PEM\n").unwrap();
        // A PEM block whose body is not base64, and one whose base64 is no certificate.
        let broken = pki.path("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
        let bogus = pki.path("bogus.pem");
        std::fs::write(&bogus, "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n").unwrap();
        let no_cert = "no certificate in it (expected \"-----BEGIN CERTIFICATE-----\")";
        let no_key = "no private key in it (expected \"-----BEGIN PRIVATE KEY-----\")";
        for (c, k, ca, blamed, says) in [
            (&junk, &key, None, ("tls_cert_file", &junk), no_cert),
            (&cert, &junk, None, ("tls_key_file", &junk), no_key),
            // The certificate where the key should be.
            (&cert, &cert, None, ("tls_key_file", &cert), no_key),
            (&broken, &key, None, ("tls_cert_file", &broken), "not a PEM file: "),
            (&bogus, &key, None, ("tls_cert_file", &bogus), "not a usable certificate: "),
            (&cert, &key, Some(&junk), ("tls_client_ca_file", &junk), no_cert),
        ] {
            let e = server_config(c, k, ca.map(|p| p.as_path())).expect_err("refused").to_string();
            let (name, file) = blamed;
            assert!(e.starts_with(&format!("{name} {}: {says}", file.display())), "{e}");
        }
    }

    #[test]
    fn missing_files_are_named() {
        let pki = Pki::new();
        let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
        let missing = pki.path("missing.pem");
        for (c, k, ca, name) in [
            (&missing, &key, None, "tls_cert_file"),
            (&cert, &missing, None, "tls_key_file"),
            (&cert, &key, Some(&missing), "tls_client_ca_file"),
        ] {
            let e = server_config(c, k, ca.map(|p| p.as_path())).expect_err("refused").to_string();
            assert!(e.starts_with(&format!("{name} {}: cannot read: ", missing.display())), "{e}");
        }
    }

    #[test]
    fn from_config_and_check() {
        let pki = Pki::new();
        let mut cfg = Config::default();
        assert!(from_config(&cfg).unwrap().is_none());
        assert_eq!(check(&cfg), Ok(()));
        cfg.tls_cert_file = Some(pki.path("server.pem"));
        cfg.tls_key_file = Some(pki.path("server.key"));
        assert!(from_config(&cfg).unwrap().is_some());
        assert_eq!(check(&cfg), Ok(()));
        cfg.tls_key_file = Some(pki.path("nope.key"));
        assert!(check(&cfg).unwrap_err().starts_with("tls_key_file "));
    }
}
