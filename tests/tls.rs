//! The TLS port (issue 12), against the built daemon: certificates made here by rcgen,
//! a rustls client (ring) speaking the plain protocol inside TLS.
//!
//! Each test starts its own daemon with `port = 0` and `tls_port = 0`, and finds the TLS
//! port in the `tls listening on ADDRESS` log line.

mod util;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use util::{parse_ok_pub, Daemon, WAIT};

const SERVER: ExtendedKeyUsagePurpose = ExtendedKeyUsagePurpose::ServerAuth;
const CLIENT: ExtendedKeyUsagePurpose = ExtendedKeyUsagePurpose::ClientAuth;

/// The files of a test's certificates, in a temporary folder that outlives the daemon.
struct Pki {
    dir: tempfile::TempDir,
}

/// One certificate authority; `NAME.pem` in the folder.
struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        Pki { dir: tempfile::Builder::new().prefix("notifd-tls-").tempdir().expect("temporary folder") }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A self-signed CA written as `NAME.pem`.
    fn authority(&self, name: &str) -> Authority {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("notifd test {name}"));
        let cert = params.self_signed(&key).expect("CA certificate");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write CA");
        Authority { cert, key }
    }

    /// Writes `NAME.pem` and `NAME.key`: a certificate for `subject` for the use
    /// `usage` (server or client), signed by `by` or by itself.
    fn issue(&self, name: &str, subject: &str, usage: ExtendedKeyUsagePurpose, by: Option<&Authority>) {
        let mut params = CertificateParams::new(vec![subject.to_owned()]).expect("params");
        params.extended_key_usages.push(usage);
        params.distinguished_name.push(DnType::CommonName, subject);
        let key = KeyPair::generate().expect("key");
        let signed = match by {
            Some(ca) => params.signed_by(&key, &ca.cert, &ca.key),
            None => params.self_signed(&key),
        };
        let pem = signed.expect("certificate").pem();
        for (ext, text) in [("pem", pem), ("key", key.serialize_pem())] {
            std::fs::write(self.path(&format!("{name}.{ext}")), text).expect("write certificate or key");
        }
    }

    /// The configuration lines for a TLS port serving `server.pem`, with
    /// `tls_client_ca_file = clients.pem` when `client_ca`.
    fn config(&self, client_ca: bool) -> String {
        let mut text = format!(
            "tls_port = 0\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            self.path("server.pem").display().to_string(),
            self.path("server.key").display().to_string()
        );
        if client_ca {
            text.push_str(&format!(
                "tls_client_ca_file = {:?}\n",
                self.path("clients.pem").display().to_string()
            ));
        }
        text
    }

    /// A client configuration trusting the CA `ca` (`NAME.pem`), presenting the client
    /// certificate `cert` (`NAME.pem`/`NAME.key`) if given, offering ALPN `notifd/1`.
    fn client(&self, ca: &str, cert: Option<&str>) -> Arc<ClientConfig> {
        let anchors = CertificateDer::pem_file_iter(self.path(&format!("{ca}.pem"))).expect("CA file");
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(anchors.map(|c| c.expect("CA PEM")));
        assert!(added > 0, "no CA in {ca}.pem");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let trusting = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .expect("TLS 1.2 and 1.3")
            .with_root_certificates(roots);
        let mut config = match cert.map(|name| self.pair(name)) {
            None => trusting.with_no_client_auth(),
            Some((chain, key)) => trusting.with_client_auth_cert(chain, key).expect("client certificate"),
        };
        config.alpn_protocols.push(b"notifd/1".to_vec());
        Arc::new(config)
    }

    /// The chain and key of `NAME.pem` and `NAME.key`.
    fn pair(&self, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let chain = CertificateDer::pem_file_iter(self.path(&format!("{name}.pem")))
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .expect("PEM chain");
        (chain, PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).expect("PEM key"))
    }
}

/// A server CA `ca.pem` with `server.pem` for localhost, and a client CA `clients.pem`
/// with `client.pem`, plus `stranger.pem`, a self-signed client certificate.
fn standard_pki() -> Pki {
    let pki = Pki::new();
    let ca = pki.authority("ca");
    pki.issue("server", "localhost", SERVER, Some(&ca));
    let clients = pki.authority("clients");
    pki.issue("client", "publisher", CLIENT, Some(&clients));
    pki.issue("stranger", "publisher", CLIENT, None);
    pki
}

/// The TLS address in the daemon's log.
fn tls_addr(d: &Daemon) -> SocketAddr {
    let line = d.wait_log(|l| l.contains("tls listening on "), WAIT);
    let addr = line.rsplit("tls listening on ").next().unwrap().trim();
    addr.parse().unwrap_or_else(|e| panic!("bad address {addr:?}: {e}"))
}

/// A line client inside TLS, over a socket (or a wrapper of one).
struct TlsClient<S: Read + Write = TcpStream> {
    s: StreamOwned<ClientConnection, S>,
    buf: Vec<u8>,
}

impl TlsClient {
    /// Connects and finishes the handshake (the client's side of it), greeting unread.
    fn handshake(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsClient> {
        let sock = TcpStream::connect_timeout(&addr, WAIT)?;
        sock.set_read_timeout(Some(WAIT))?;
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(config, name).expect("client connection");
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(TlsClient { s, buf: Vec::new() })
    }

    /// Connects, and reads the greeting.
    fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsClient {
        let mut c = TlsClient::handshake(addr, config).expect("TLS handshake");
        let hello = c.line();
        assert!(hello.starts_with("HELLO notifd 1 "), "greeting {hello:?}");
        c
    }
}

impl<S: Read + Write> TlsClient<S> {
    fn cmd(&mut self, line: &str) {
        self.s.write_all(format!("{line}\r\n").as_bytes()).expect("send inside TLS");
        self.s.flush().expect("flush");
    }

    /// The next line, `Ok(None)` at a clean end (close_notify), `Err` for anything else.
    fn try_line(&mut self) -> io::Result<Option<String>> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=i).collect();
                assert!(raw.ends_with(b"\r\n"), "line not ended by CRLF: {raw:?}");
                return Ok(Some(String::from_utf8(raw[..raw.len() - 2].to_vec()).expect("UTF-8")));
            }
            assert!(Instant::now() < deadline, "no line within {WAIT:?}");
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk)? {
                0 => return Ok(None),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn line(&mut self) -> String {
        self.try_line().expect("a line inside TLS").expect("a line, not the end")
    }

    fn expect(&mut self, want: &str) {
        assert_eq!(self.line(), want);
    }
}

/// Reads a raw socket until the end (bounded); what came, and whether it ended by a
/// reset rather than a FIN.
fn read_to_end(sock: &mut TcpStream) -> (Vec<u8>, bool) {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match sock.read(&mut chunk) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (got, true),
            Err(e) => panic!("the connection was not closed: {e} (after {got:?})"),
        }
    }
}

#[test]
fn the_example_session_over_tls() {
    let pki = standard_pki();
    let d = Daemon::start(&pki.config(false));
    let addr = tls_addr(&d);
    let mut c = TlsClient::connect(addr, pki.client("ca", None));
    assert_eq!(c.s.conn.alpn_protocol(), Some(&b"notifd/1"[..]));
    c.cmd("SUB orders.shipped ana@example.com");
    c.expect("+OK SUB orders.shipped");
    // Loopback and no publish_token: trusted, as over plain TCP.
    c.cmd("PUB orders.shipped Order 1042 has shipped");
    let msg = c.line();
    let (id, n) = parse_ok_pub(&c.line());
    assert_eq!(msg, format!("MSG orders.shipped {id} Order 1042 has shipped"));
    assert_eq!(n, 1);
    c.cmd("PING");
    c.expect("PONG");
    c.cmd("QUIT");
    c.expect("+OK QUIT");
    assert_eq!(c.try_line().expect("a clean end: close_notify, then the close"), None);

    // The same lines as a plain client gets them.
    let mut p = d.client();
    p.cmd("SUB orders.shipped bo@example.com");
    p.expect("+OK SUB orders.shipped");
    let mut t = TlsClient::connect(addr, pki.client("ca", None));
    t.cmd("PUB orders.shipped again");
    let (id, _) = parse_ok_pub(&t.line());
    p.expect(&format!("MSG orders.shipped {id} again"));
}

#[test]
fn a_client_trusting_another_ca_fails_the_handshake() {
    let pki = standard_pki();
    let d = Daemon::start(&pki.config(false));
    let err = TlsClient::handshake(tls_addr(&d), pki.client("clients", None))
        .err()
        .expect("a server certificate from an unknown CA is refused by the client");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The server is fine.
    TlsClient::connect(tls_addr(&d), pki.client("ca", None)).cmd("PING");
}

#[test]
fn a_client_certificate_from_the_client_ca_is_trusted_others_are_refused() {
    let pki = standard_pki();
    let d = Daemon::start(&format!("{}publish_token = \"sesame\"\n", pki.config(true)));
    let addr = tls_addr(&d);

    let mut trusted = TlsClient::connect(addr, pki.client("ca", Some("client")));
    trusted.cmd("PUB news hello");
    let (_, n) = parse_ok_pub(&trusted.line());
    assert_eq!(n, 0);
    trusted.cmd("LIST nobody@example.com");
    assert!(trusted.line().starts_with("+OK LIST"), "LIST allowed too");

    // No certificate: served, untrusted, like a plain client.
    let mut anonymous = TlsClient::connect(addr, pki.client("ca", None));
    anonymous.cmd("PUB news hello");
    assert!(anonymous.line().starts_with("-ERR AUTH "), "untrusted without a certificate");
    anonymous.cmd("AUTH sesame");
    anonymous.expect("+OK AUTH");
    anonymous.cmd("PUB news hello");
    parse_ok_pub(&anonymous.line());

    // A certificate not signed by tls_client_ca_file: the handshake fails (under TLS 1.3
    // the client learns it when it reads: the server checks last).
    let refused = TlsClient::handshake(addr, pki.client("ca", Some("stranger")))
        .and_then(|mut c| c.try_line().map(|l| l.unwrap_or_default()));
    let err = refused.expect_err("a stranger's certificate is refused");
    assert!(err.to_string().contains("alert"), "refused with an alert: {err}");
}

#[test]
fn a_reload_serves_the_new_certificate_to_new_connections_only() {
    let pki = standard_pki();
    let mut d = Daemon::start(&pki.config(false));
    let addr = tls_addr(&d);
    let mut old = TlsClient::connect(addr, pki.client("ca", None));
    old.cmd("SUB feed old@example.com");
    old.expect("+OK SUB feed");

    // Renewed, by another CA, as a HUP after certbot would find it.
    let ca2 = pki.authority("ca2");
    pki.issue("server", "localhost", SERVER, Some(&ca2));
    d.signal(libc::SIGHUP);
    d.wait_log(|l| l.contains("configuration reloaded"), WAIT);
    let mut new = TlsClient::connect(addr, pki.client("ca2", None));
    assert!(
        TlsClient::handshake(addr, pki.client("ca", None)).is_err(),
        "a new connection still got the old certificate"
    );
    // The old connection goes on, and receives.
    new.cmd("PUB feed after the reload");
    let (id, n) = parse_ok_pub(&new.line());
    assert_eq!(n, 1);
    old.expect(&format!("MSG feed {id} after the reload"));
    old.cmd("PING");
    old.expect("PONG");

    // A key that does not match: the reload is refused, the running pair kept.
    let pki_other = Pki::new();
    pki_other.issue("server", "localhost", SERVER, None);
    std::fs::copy(pki_other.path("server.key"), pki.path("server.key")).unwrap();
    d.signal(libc::SIGHUP);
    let line = d.wait_log(|l| l.contains("reload refused"), WAIT);
    assert!(line.contains("does not match"), "{line}");
    TlsClient::connect(addr, pki.client("ca2", None)).cmd("PING");
    let _ = d.stop();
}

#[test]
fn a_stalled_handshake_is_closed_after_10_seconds() {
    let pki = standard_pki();
    let d = Daemon::start(&pki.config(false));
    let t0 = Instant::now();
    let mut sock = TcpStream::connect(tls_addr(&d)).unwrap();
    // Half a ClientHello record header: the server waits for the rest.
    sock.write_all(&[0x16, 0x03]).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 64];
    let n = sock.read(&mut buf).unwrap_or(0);
    let waited = t0.elapsed();
    assert_eq!(n, 0, "closed without a word");
    assert!(waited >= Duration::from_millis(9_500), "closed after {waited:?}, before 10 s");
    assert!(waited < Duration::from_secs(15), "closed after {waited:?}");
    d.wait_log(|l| l.contains("TLS handshake not finished"), WAIT);
}

#[test]
fn plain_text_to_the_tls_port_is_closed() {
    let pki = standard_pki();
    let d = Daemon::start(&pki.config(false));
    let mut sock = TcpStream::connect(tls_addr(&d)).unwrap();
    sock.write_all(b"PING\r\n").unwrap();
    let (got, _) = read_to_end(&mut sock);
    // At most a TLS alert record (content type 21), never a protocol line.
    assert!(got.is_empty() || got[0] == 0x15, "answered {:?}", String::from_utf8_lossy(&got));
    TlsClient::connect(tls_addr(&d), pki.client("ca", None)).cmd("PING");
}

#[test]
fn a_tls_client_hello_on_the_plain_port_gets_only_a_close() {
    let pki = standard_pki();
    let d = Daemon::start(&pki.config(false));
    // A real ClientHello, as the client library makes it.
    let mut conn =
        ClientConnection::new(pki.client("ca", None), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16);
    let mut sock = TcpStream::connect(d.addr()).unwrap();
    sock.write_all(&hello).unwrap();
    let (got, reset) = read_to_end(&mut sock);
    let text = String::from_utf8_lossy(&got);
    // The greeting went out on accept, before the ClientHello came; then nothing.
    assert_eq!(text.lines().count(), 1, "answered {text:?}");
    assert!(text.starts_with("HELLO notifd 1 "), "{text:?}");
    assert!(!reset, "closed by a reset");
    d.client().cmd("PING");
    d.wait_log(|l| l.contains("TLS handshake on the plain port"), WAIT);
}

#[test]
fn a_slow_tls_consumer_is_dropped_like_a_plain_one() {
    let pki = standard_pki();
    let d = Daemon::start(&format!("{}max_pending = 65536\n", pki.config(false)));
    let addr = tls_addr(&d);
    // A small receive buffer, so that the kernel does not hide the slowness.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect_timeout(&addr.into(), WAIT).unwrap();
    let sock: TcpStream = sock.into();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut s = StreamOwned::new(ClientConnection::new(pki.client("ca", None), name).unwrap(), sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("handshake");
    }
    let mut slow = TlsClient { s, buf: Vec::new() };
    slow.line();
    slow.cmd("SUB feed slow@example.com");
    slow.expect("+OK SUB feed");
    let local = slow.s.sock.local_addr().unwrap();

    let mut p = d.client();
    let text = "t".repeat(1000);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0usize;
    loop {
        p.cmd(&format!("PUB feed {text}"));
        let (_, n) = parse_ok_pub(&p.line());
        if n == 0 {
            break;
        }
        sent += 1;
        assert!(Instant::now() < deadline, "the slow TLS consumer was never dropped ({sent} MSGs)");
    }
    let line = d.wait_log(|l| l.contains("slow consumer"), WAIT);
    assert!(line.contains(&local.to_string()), "the log names the peer: {line:?}");
    // It was dropped with less than everything delivered.
    let mut got = 0usize;
    while let Ok(Some(_)) = slow.try_line() {
        got += 1;
    }
    assert!(got < sent, "got {got} of {sent}: it was not slow");
}

#[test]
fn sigterm_says_goodbye_inside_tls_then_close_notify() {
    let pki = standard_pki();
    let mut d = Daemon::start(&pki.config(false));
    let mut c = TlsClient::connect(tls_addr(&d), pki.client("ca", None));
    c.cmd("PING");
    c.expect("PONG");
    d.signal(libc::SIGTERM);
    c.expect("-ERR BUSY shutting down");
    // Ok(None): rustls reports a clean end only after close_notify.
    assert_eq!(c.try_line().expect("close_notify before the close"), None);
    assert!(d.wait_exit(WAIT).is_some_and(|s| s.success()));
}

#[test]
fn plain_false_leaves_only_the_tls_port() {
    let pki = standard_pki();
    let d = Daemon::start(&format!("{}plain = false\n", pki.config(false)));
    let addr = tls_addr(&d);
    assert!(!d.log_lines().iter().any(|l| l.contains(": listening on ")), "{}", d.log_text());
    TlsClient::connect(addr, pki.client("ca", None)).cmd("PING");
}

#[test]
fn check_mode_loads_the_certificate_and_key() {
    let pki = standard_pki();
    let other = Pki::new();
    other.issue("server", "localhost", SERVER, None);
    let conf = util::write_config(pki.dir.path(), &pki.config(false));
    let ok = std::process::Command::new(util::bin()).arg("-t").arg("-c").arg(&conf).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    std::fs::copy(other.path("server.key"), pki.path("server.key")).unwrap();
    let bad = std::process::Command::new(util::bin()).arg("-t").arg("-c").arg(&conf).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("does not match the certificate"), "{err}");
}

/// A socket that counts the TLS records (of any type) that it reads.
struct RecordCounter {
    sock: TcpStream,
    /// Bytes of the next record header seen so far.
    header: Vec<u8>,
    /// Bytes of the current record's body still to come.
    body_left: usize,
    records: usize,
}

impl Read for RecordCounter {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if self.body_left > 0 {
                let skip = self.body_left.min(rest.len());
                self.body_left -= skip;
                rest = &rest[skip..];
                continue;
            }
            self.header.push(rest[0]);
            rest = &rest[1..];
            if self.header.len() == 5 {
                self.records += 1;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header.clear();
            }
        }
        Ok(n)
    }
}

impl Write for RecordCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

#[test]
fn a_turns_msgs_leave_in_few_tls_records_not_one_each() {
    let pki = standard_pki();
    let d = Daemon::start(&pki.config(false));
    let sock = TcpStream::connect(tls_addr(&d)).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let counter = RecordCounter { sock, header: Vec::new(), body_left: 0, records: 0 };
    let name = ServerName::try_from("localhost").unwrap();
    let mut s = StreamOwned::new(ClientConnection::new(pki.client("ca", None), name).unwrap(), counter);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("handshake");
    }
    let mut sub = TlsClient { s, buf: Vec::new() };
    assert!(sub.line().starts_with("HELLO notifd 1 "));
    sub.cmd("SUB feed batch@example.com");
    sub.expect("+OK SUB feed");
    let before = sub.s.sock.records;

    // Many PUBs in one write: their MSGs are fanned out in a few loop turns.
    const N: usize = 200;
    let mut p = d.client();
    let batch: String = (0..N).map(|i| format!("PUB feed message {i}\r\n")).collect();
    p.send(&batch);
    for _ in 0..N {
        parse_ok_pub(&p.line());
    }
    for i in 0..N {
        let line = sub.line();
        assert!(line.starts_with("MSG feed ") && line.ends_with(&format!(" message {i}")), "{line:?}");
    }
    let records = sub.s.sock.records - before;
    eprintln!("{N} MSGs in {records} TLS records");
    assert!(records <= N / 10, "{N} MSGs came in {records} TLS records: not batched per turn");
}

#[test]
fn a_handshake_holds_its_connection_slot_from_accept_on() {
    let pki = standard_pki();
    let d = Daemon::start(&format!("{}max_clients_per_ip = 1\n", pki.config(false)));
    // Connected, not one byte of handshake sent.
    let mut silent = TcpStream::connect(tls_addr(&d)).unwrap();
    d.wait_log(|l| l.contains("connected"), WAIT);
    let mut plain = util::Client::connect_raw(d.addr());
    assert_eq!(plain.line(), "-ERR BUSY too many connections from your address");
    let _ = silent.shutdown(std::net::Shutdown::Both);
    let _ = read_to_end(&mut silent);
    d.wait_log(|l| l.contains("closed"), WAIT);
    TlsClient::connect(tls_addr(&d), pki.client("ca", None)).cmd("PING");
}

#[test]
fn the_tls_port_is_dual_stack_like_the_plain_one() {
    if !util::have_ipv6_loopback() {
        return util::skip("the_tls_port_is_dual_stack_like_the_plain_one", "no IPv6 loopback");
    }
    let pki = standard_pki();
    let d = Daemon::start(&format!("host = \"::\"\n{}", pki.config(false)));
    let port = tls_addr(&d).port();
    for addr in
        [SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))]
    {
        let mut c = TlsClient::connect(addr, pki.client("ca", None));
        c.cmd("PING");
        c.expect("PONG");
    }
}
