//! notif(1) with `--tls`, through the built binary, against a small TLS server in this
//! file: notifd has no TLS port yet (issue 12's reactor part), and what is tested here is
//! the client's half: the handshake, the check of the server's certificate and name, the
//! client certificate, and the protocol lines going through the TLS stream. The server
//! is rustls (ring) on 127.0.0.1:0 with certificates made by rcgen; it speaks just
//! enough of PROTOCOL.md (greeting, PING, PUB, SUB, LIST, QUIT) and reports what it saw
//! on a channel.

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const NOTIF: &str = env!("CARGO_BIN_EXE_notif");
/// Generous: the machines are shared.
const WAIT: Duration = Duration::from_secs(30);
/// notif's exit status for a connection that failed, TLS handshake included (notif(1)).
const EXIT_CONNECT: i32 = 3;
/// notif's exit status for a bad command line, unusable files given to it included.
const EXIT_USAGE: i32 = 2;

/// A certificate authority whose files live in a temporary folder.
struct Ca {
    dir: tempfile::TempDir,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A new CA, written as `NAME.pem` in a new temporary folder.
    fn new(name: &str) -> Ca {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).expect("write CA");
        Ca { dir, cert, key }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    /// Signs a certificate for `subject` (a server's DNS name or a client's name) and
    /// writes `NAME.pem` and `NAME.key`.
    fn issue(&self, name: &str, subject: &str, usage: ExtendedKeyUsagePurpose) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![subject.to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, subject);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write certificate");
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).expect("write key");
    }

    /// A server configuration with `localhost`'s certificate from this CA; with
    /// `client_ca`, a client certificate signed by that CA is required.
    fn server(&self, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
        self.issue("localhost", "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let chain = CertificateDer::pem_file_iter(self.path("localhost.pem"))
            .expect("chain")
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM chain");
        let key = PrivateKeyDer::from_pem_file(self.path("localhost.key")).expect("PEM key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.cert.der().clone()).expect("client CA");
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).expect("server certificate");
        config.alpn_protocols = vec![b"notifd/1".to_vec()];
        Arc::new(config)
    }
}

/// The TLS server: one thread accepting on 127.0.0.1, one thread per connection, each
/// bounded by read timeouts. What they see arrives on `events`.
struct FakeServer {
    addr: SocketAddr,
    events: Receiver<String>,
}

impl FakeServer {
    fn start(config: Arc<ServerConfig>) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let (tx, events) = mpsc::channel();
        // The accept loop ends with the test process; it holds nothing else.
        thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { return };
                let (config, tx) = (config.clone(), tx.clone());
                thread::spawn(move || serve(sock, config, tx));
            }
        });
        FakeServer { addr, events }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// The next thing a connection reported.
    fn event(&self) -> String {
        self.events.recv_timeout(WAIT).expect("an event from the TLS server")
    }
}

fn serve(sock: TcpStream, config: Arc<ServerConfig>, events: Sender<String>) {
    let report = |what: String| {
        let _ = events.send(what);
    };
    sock.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut tls = StreamOwned::new(ServerConnection::new(config).expect("server connection"), sock);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            return report(format!("handshake failed: {e}"));
        }
    }
    let alpn = tls.conn.alpn_protocol().map_or("none".into(), |p| String::from_utf8_lossy(p).into_owned());
    let certs = tls.conn.peer_certificates().map_or(0, |c| c.len());
    report(format!("handshake alpn={alpn} client_certs={certs}"));
    if tls.write_all(b"HELLO notifd 1\r\n").and_then(|()| tls.flush()).is_err() {
        return report("greeting not sent".into());
    }
    loop {
        let mut line = String::new();
        match tls.read_line(&mut line) {
            Ok(0) => return report("eof".into()),
            Ok(_) => {}
            Err(e) => return report(format!("read failed: {e}")),
        }
        let line = line.trim_end_matches(['\r', '\n']);
        report(format!("got {line}"));
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let reply = match verb {
            "PING" if rest.is_empty() => "PONG".to_string(),
            "PING" => format!("PONG {rest}"),
            "PUB" => "+OK PUB 42 0".into(),
            "SUB" => {
                let event = rest.split(' ').next().unwrap_or("");
                format!("+OK\r\nMSG {event} 43 hello over tls")
            }
            "LIST" => format!("SUB news {rest} 2026-01-01T00:00:00Z\r\n+OK"),
            "QUIT" => "+OK QUIT".into(),
            _ => "-ERR UNKNOWN".into(),
        };
        if tls.write_all(format!("{reply}\r\n").as_bytes()).and_then(|()| tls.flush()).is_err() {
            return report("reply not sent".into());
        }
        if verb == "QUIT" {
            tls.conn.send_close_notify();
            let _ = tls.flush();
            return report("closed".into());
        }
    }
}

/// notif with `args`, none of the caller's `NOTIF_*` or `SSL_CERT_*` variables.
fn notif(args: &[&str]) -> Command {
    let mut cmd = Command::new(NOTIF);
    for var in ["NOTIF_HOST", "NOTIF_PORT", "NOTIF_TOKEN", "SSL_CERT_FILE", "SSL_CERT_DIR"] {
        cmd.env_remove(var);
    }
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// A notif process, killed and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs notif to its end, at most WAIT.
fn run(args: &[&str]) -> Output {
    let mut child = Running(notif(args).spawn().expect("spawn notif"));
    let (mut stdout, mut stderr) = (child.0.stdout.take().unwrap(), child.0.stderr.take().unwrap());
    let (done, finished) = mpsc::channel();
    // Both pipes read to their end: the child cannot block on a full one.
    thread::spawn(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let _ = stdout.read_to_end(&mut out);
        let _ = stderr.read_to_end(&mut err);
        let _ = done.send((out, err));
    });
    let (stdout, stderr) =
        finished.recv_timeout(WAIT).unwrap_or_else(|_| panic!("notif {args:?} still running after {WAIT:?}"));
    let status = child.0.wait().expect("wait notif");
    Output { status, stdout, stderr }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("notif exited, not killed")
}

#[test]
fn ping_pub_and_list_go_through_tls() {
    let ca = Ca::new("ca");
    let server = FakeServer::start(ca.server(None));
    let tls = ["--tls", "--ca", &ca.arg("ca.pem"), "-H", "localhost", "-p", &server.port()];

    let o = run(&[&tls[..], &["ping"]].concat());
    assert_eq!((code(&o), text(&o.stdout).as_str()), (0, "PONG\n"), "{}", text(&o.stderr));
    assert_eq!(server.event(), "handshake alpn=notifd/1 client_certs=0");
    assert_eq!(server.event(), "got PING");
    assert_eq!(server.event(), "got QUIT");
    assert_eq!(server.event(), "closed");

    let o = run(&[&tls[..], &["pub", "news", "hello", "world"]].concat());
    assert_eq!((code(&o), text(&o.stdout).as_str()), (0, "42\n"), "{}", text(&o.stderr));
    server.event();
    assert_eq!(server.event(), "got PUB news hello world");

    let o = run(&[&tls[..], &["list", "a@example.com"]].concat());
    assert_eq!(
        (code(&o), text(&o.stdout).as_str()),
        (0, "news 2026-01-01T00:00:00Z\n"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn sub_prints_notifications_through_tls() {
    let ca = Ca::new("ca");
    let server = FakeServer::start(ca.server(None));
    let args = ["--tls", "--ca", &ca.arg("ca.pem"), "-H", "localhost", "-p", &server.port()];
    let mut sub = Running(notif(&[&args[..], &["sub", "a@example.com", "news"]].concat()).spawn().unwrap());
    let stdout = sub.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    assert_eq!(lines.recv_timeout(WAIT).expect("a notification"), "news 43 hello over tls");
    server.event();
    assert_eq!(server.event(), "got SUB news a@example.com");
}

#[test]
fn a_server_certificate_from_another_ca_fails_with_exit_3() {
    let ca = Ca::new("ca");
    let other = Ca::new("other");
    let server = FakeServer::start(ca.server(None));
    let o = run(&["--tls", "--ca", &other.arg("other.pem"), "-H", "localhost", "-p", &server.port(), "ping"]);
    let err = text(&o.stderr);
    assert_eq!(code(&o), EXIT_CONNECT, "{err}");
    assert!(
        err.starts_with("notif: 127.0.0.1:") && err.contains("TLS handshake: invalid peer certificate"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    assert!(server.event().starts_with("handshake failed: "), "the server saw the client give up");
}

#[test]
fn a_certificate_for_another_name_fails_with_exit_3() {
    let ca = Ca::new("ca");
    let server = FakeServer::start(ca.server(None));
    // The certificate names localhost, not 127.0.0.1.
    let o = run(&["--tls", "--ca", &ca.arg("ca.pem"), "-H", "127.0.0.1", "-p", &server.port(), "ping"]);
    let err = text(&o.stderr);
    assert_eq!(code(&o), EXIT_CONNECT, "{err}");
    assert!(err.contains("TLS handshake: invalid peer certificate") && err.contains("127.0.0.1"), "{err}");
}

#[test]
fn a_client_certificate_is_presented_with_cert_and_key() {
    let ca = Ca::new("ca");
    let clients = Ca::new("clients");
    clients.issue("alice", "alice", ExtendedKeyUsagePurpose::ClientAuth);
    let server = FakeServer::start(ca.server(Some(&clients)));
    let base = ["--tls", "--ca", &ca.arg("ca.pem"), "-H", "localhost", "-p", &server.port()];

    let with_cert = ["--cert", &clients.arg("alice.pem"), "--key", &clients.arg("alice.key"), "ping", "me"];
    let o = run(&[&base[..], &with_cert].concat());
    assert_eq!((code(&o), text(&o.stdout).as_str()), (0, "PONG me\n"), "{}", text(&o.stderr));
    assert_eq!(server.event(), "handshake alpn=notifd/1 client_certs=1");
    for want in ["got PING me", "got QUIT", "closed"] {
        assert_eq!(server.event(), want);
    }

    // This server requires one: without it, the connection fails (TLS 1.3 tells the
    // client only after its side of the handshake, when it reads the greeting).
    let o = run(&[&base[..], &["ping"]].concat());
    let err = text(&o.stderr);
    assert_eq!(code(&o), EXIT_CONNECT, "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let event = server.event();
    assert!(event.starts_with("handshake failed: "), "{event}");
}

/// A TCP server that is not TLS: it sends `first` to its one client, then holds the
/// connection, silent, until the client leaves; returns its port.
fn not_tls(first: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port().to_string();
    thread::spawn(move || {
        if let Ok((mut sock, _)) = listener.accept() {
            let _ = sock.set_read_timeout(Some(WAIT));
            let _ = sock.write_all(first);
            let _ = sock.read_to_end(&mut Vec::new());
        }
    });
    port
}

#[test]
fn a_port_that_does_not_speak_tls_fails_with_exit_3() {
    let ca = Ca::new("ca");
    for (first, says) in [
        (&b"HELLO notifd 1\r\n"[..], "(not a TLS port?)"),
        // The client's bound on the handshake, as on connecting: 10 s.
        (b"", "TLS handshake: no answer in time"),
    ] {
        let port = not_tls(first);
        let o = run(&["--tls", "--ca", &ca.arg("ca.pem"), "-H", "127.0.0.1", "-p", &port, "ping"]);
        let err = text(&o.stderr);
        assert_eq!(code(&o), EXIT_CONNECT, "{err}");
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn unusable_files_are_usage_errors_naming_the_file() {
    let ca = Ca::new("ca");
    std::fs::write(ca.path("junk.pem"), "not PEM at all\n").unwrap();
    ca.issue("alice", "alice", ExtendedKeyUsagePurpose::ClientAuth);
    ca.issue("bob", "bob", ExtendedKeyUsagePurpose::ClientAuth);
    let missing = ca.arg("missing.pem");
    let (junk, alice, bob_key) = (ca.arg("junk.pem"), ca.arg("alice.pem"), ca.arg("bob.key"));
    for (args, names) in [
        (vec!["--ca", &missing], &missing),
        (vec!["--ca", &junk], &junk),
        (vec!["--ca", &alice, "--cert", &alice, "--key", &junk], &junk),
        (vec!["--ca", &alice, "--cert", &alice, "--key", &bob_key], &bob_key),
    ] {
        // Nothing listens there: the files are read before any connection.
        let o = run(&[&["--tls", "-H", "localhost", "-p", "1"], &args[..], &["ping"]].concat());
        let err = text(&o.stderr);
        assert_eq!(code(&o), EXIT_USAGE, "{args:?}: {err}");
        assert!(err.contains(names.as_str()), "{args:?}: {err}");
    }
}
