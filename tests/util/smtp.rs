//! A real SMTP server for tests, inside the test process: the `mailin` crate's SMTP
//! session (commands, replies, AUTH, STARTTLS negotiation) behind a listener on
//! 127.0.0.1:0, one thread per connection, rustls for the TLS. One per test, stopped
//! when the value is dropped. Nothing to install: the test build brings it.

#![allow(dead_code)] // each test file uses a different part

use mailin::{response, Action, AuthMechanism, Handler, Response, Session, SessionBuilder};
use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the server refuses things.
#[derive(Default, Clone)]
pub struct Options {
    /// Answer 421 to the first this many MAIL commands.
    pub tempfail: u32,
    /// Answer 550 to every RCPT whose address contains this.
    pub reject_rcpt: Option<String>,
    /// Answer 451 to every RCPT whose address contains this.
    pub defer_rcpt: Option<String>,
    /// Answer 421 to a MAIL after this many messages on one connection (0: no limit).
    pub max_per_conn: u32,
    /// Offer STARTTLS, required, with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: TLS from the first byte instead of STARTTLS.
    pub implicit_tls: bool,
    /// Require AUTH (PLAIN or LOGIN) with this user and password: offered once the
    /// connection is encrypted when `tls` is set, in plain text otherwise.
    pub auth: Option<(String, String)>,
    /// Count messages without saving them.
    pub no_save: bool,
    /// Start as a relay that is down: greet every connection with 421 and close it,
    /// until [`SmtpServer::set_down`] brings it up.
    pub down: bool,
}

/// A running server.
///
/// Everything it sees is recorded before its SMTP reply goes out, so a client that got
/// its reply finds it in [`SmtpServer::events`] at once:
///
/// ```text
/// conn <n>              a connection was accepted (n counts from 1)
/// msg <n> tls|plain     a message was accepted on connection n
/// reply <n> <code>      a greeting, MAIL or RCPT was refused with <code>
/// auth <n> ok|refused   an AUTH on connection n
/// ```
pub struct SmtpServer {
    /// The loopback port it listens on (127.0.0.1).
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// One message as the server received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// The connection (counted from 1) it came on.
    pub conn: u32,
    /// Whether that connection was encrypted (STARTTLS or implicit TLS).
    pub tls: bool,
    /// `MAIL FROM` and `RCPT TO`.
    pub envelope_from: String,
    pub envelope_to: Vec<String>,
    /// The message bytes after the DATA command, dot-unstuffed.
    pub raw: Vec<u8>,
}

struct Shared {
    options: Options,
    tls: Option<Arc<rustls::ServerConfig>>,
    stopping: AtomicBool,
    down: AtomicBool,
    record: Mutex<Record>,
}

#[derive(Default)]
struct Record {
    events: Vec<String>,
    received: Vec<Received>,
    connections: u32,
    messages: usize,
    mails: u32,
    /// What went wrong inside the server (TLS handshakes, I/O), for failure messages.
    errors: Vec<String>,
    /// Each connection's socket, to shut down on drop, and its thread.
    sockets: Vec<TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    fn record(&self) -> MutexGuard<'_, Record> {
        // A panic in one connection thread must not hide what the others recorded.
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn event(&self, line: String) {
        self.record().events.push(line);
    }
}

/// Idle connections end after this long; the test's own timeouts are shorter.
const IDLE: Duration = Duration::from_secs(120);

impl SmtpServer {
    pub fn start(options: Options) -> SmtpServer {
        let tls = options.tls.as_ref().map(|(chain, key)| Arc::new(server_config(chain, key)));
        assert!(tls.is_some() || !options.implicit_tls, "implicit_tls needs tls");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the SMTP server");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            down: AtomicBool::new(options.down),
            options,
            tls,
            stopping: AtomicBool::new(false),
            record: Mutex::new(Record::default()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || accept(&listener, &shared))
        };
        SmtpServer { port, shared, acceptor: Some(acceptor) }
    }

    /// Takes the relay down (every new connection greeted with 421) or brings it up.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Everything recorded so far, one line each (see [`SmtpServer`]).
    pub fn events(&self) -> Vec<String> {
        self.shared.record().events.clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.record().connections as usize
    }

    /// Messages accepted so far (saved or not).
    pub fn message_count(&self) -> usize {
        self.shared.record().messages
    }

    /// The saved messages, in the order they were accepted.
    pub fn received(&self) -> Vec<Received> {
        self.shared.record().received.clone()
    }

    /// What went wrong inside the server, for failure messages.
    pub fn errors(&self) -> String {
        self.shared.record().errors.join("\n")
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which sees `stopping` and returns.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let (sockets, threads) = {
            let mut r = self.shared.record();
            (std::mem::take(&mut r.sockets), std::mem::take(&mut r.threads))
        };
        for s in &sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let mut r = shared.record();
        r.connections += 1;
        let n = r.connections;
        r.events.push(format!("conn {n}"));
        let Ok(socket) = stream.try_clone() else { continue };
        r.sockets.push(socket.try_clone().expect("clone a socket"));
        let shared = shared.clone();
        r.threads.push(std::thread::spawn(move || {
            if let Err(e) = serve(stream, n, &shared) {
                shared.record().errors.push(format!("connection {n}: {e}"));
            }
            // The clones kept for the drop hold the socket open: the client must see
            // the close now, as from a real server, not wait out its timeout.
            let _ = socket.shutdown(Shutdown::Both);
        }));
    }
}

/// One connection, from the greeting to QUIT or the client's close.
fn serve(stream: TcpStream, n: u32, shared: &Arc<Shared>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(IDLE))?;
    stream.set_nodelay(true)?;
    let mut stream = stream;
    if shared.down.load(Ordering::SeqCst) {
        shared.event(format!("reply {n} 421"));
        return stream.write_all(b"421 4.3.2 Service not available, try again later\r\n");
    }
    let options = &shared.options;
    let mut builder = SessionBuilder::new("localhost");
    if options.tls.is_some() && !options.implicit_tls {
        builder.enable_start_tls();
    }
    if options.auth.is_some() {
        builder.enable_auth(AuthMechanism::Plain).enable_auth(AuthMechanism::Login);
        if options.tls.is_none() {
            builder.insecure_enable_plaintext_auth();
        }
    }
    let encrypted = Rc::new(Cell::new(false));
    let peer = stream.peer_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let conn = Conn { n, shared: shared.clone(), encrypted: encrypted.clone(), accepted: 0, message: None };
    let mut session = builder.build(peer, conn);
    let tls = shared.tls.clone();
    if options.implicit_tls {
        let mut tls_stream = BufReader::new(tls_accept(tls.expect("tls"), stream)?);
        encrypted.set(true);
        session.tls_active();
        reply(tls_stream.get_mut(), &session.greeting())?;
        converse(&mut session, &mut tls_stream)?;
        return Ok(());
    }
    reply(&mut stream, &session.greeting())?;
    let mut plain = BufReader::new(stream);
    if converse(&mut session, &mut plain)? {
        // What the client sent after STARTTLS, before the handshake, is dropped (RFC 3207).
        let mut tls_stream = BufReader::new(tls_accept(tls.expect("tls"), plain.into_inner())?);
        encrypted.set(true);
        session.tls_active();
        converse(&mut session, &mut tls_stream)?;
    }
    Ok(())
}

/// Feeds the client's lines to the session and writes its replies; returns whether the
/// session asked for a TLS upgrade.
fn converse<S: Read + Write>(
    session: &mut Session<Conn>,
    stream: &mut BufReader<S>,
) -> std::io::Result<bool> {
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line)? == 0 {
            return Ok(false);
        }
        let res = session.process(&line);
        if res.action == Action::NoReply {
            continue;
        }
        reply(stream.get_mut(), &res)?;
        match res.action {
            Action::Close => return Ok(false),
            Action::UpgradeTls => return Ok(true),
            Action::Reply | Action::NoReply => {}
        }
    }
}

/// Writes a reply in one piece: `Response::write_to` writes each part on its own, and a
/// second small write waits for the client's delayed ACK (about 40 ms).
fn reply(out: &mut impl Write, res: &Response) -> std::io::Result<()> {
    out.write_all(&res.buffer()?)?;
    out.flush()
}

fn tls_accept(
    config: Arc<rustls::ServerConfig>,
    stream: TcpStream,
) -> std::io::Result<rustls::StreamOwned<rustls::ServerConnection, TcpStream>> {
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    // The handshake runs on the first read or write.
    Ok(rustls::StreamOwned::new(conn, stream))
}

fn server_config(chain: &Path, key: &Path) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
        .expect("chain file")
        .map(|c| c.expect("PEM certificate"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).expect("PEM key");
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate")
}

/// What one connection decides: the refusals of [`Options`], and recording.
struct Conn {
    n: u32,
    shared: Arc<Shared>,
    encrypted: Rc<Cell<bool>>,
    /// Messages accepted on this connection.
    accepted: u32,
    /// The message being received: envelope from, to, and its bytes.
    message: Option<(String, Vec<String>, Vec<u8>)>,
}

impl Conn {
    fn refuse(&self, code: u16, text: String) -> Response {
        self.shared.event(format!("reply {} {code}", self.n));
        Response::custom(code, text)
    }

    fn authenticate(&self, user: &str, password: &str) -> Response {
        let ok = self.shared.options.auth.as_ref().is_some_and(|(u, p)| u == user && p == password);
        self.shared.event(format!("auth {} {}", self.n, if ok { "ok" } else { "refused" }));
        if ok {
            response::AUTH_OK
        } else {
            response::INVALID_CREDENTIALS
        }
    }
}

impl Handler for Conn {
    fn mail(&mut self, _ip: IpAddr, _domain: &str, _from: &str) -> Response {
        let options = &self.shared.options;
        if options.tls.is_some() && !self.encrypted.get() {
            return Response::custom(530, "5.7.0 Must issue a STARTTLS command first".into());
        }
        let mails = {
            let mut r = self.shared.record();
            r.mails += 1;
            r.mails
        };
        if options.max_per_conn > 0 && self.accepted >= options.max_per_conn {
            return self.refuse(421, "4.7.0 Too many messages on this connection".into());
        }
        if mails <= options.tempfail {
            return self.refuse(421, "4.3.2 Service not available, try again later".into());
        }
        response::OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        let options = &self.shared.options;
        if options.reject_rcpt.as_deref().is_some_and(|s| to.contains(s)) {
            return self.refuse(550, format!("5.1.1 <{to}>: Recipient address rejected: no such user"));
        }
        if options.defer_rcpt.as_deref().is_some_and(|s| to.contains(s)) {
            return self.refuse(451, format!("4.7.1 <{to}>: greylisted, try again later"));
        }
        response::OK
    }

    fn data_start(&mut self, _domain: &str, from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.message = Some((from.to_owned(), to.to_vec(), Vec::new()));
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Some((_, _, raw)) = &mut self.message {
            if !self.shared.options.no_save {
                raw.extend_from_slice(buf);
            }
        }
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let Some((envelope_from, envelope_to, raw)) = self.message.take() else {
            return response::TRANSACTION_FAILED;
        };
        self.accepted += 1;
        let tls = self.encrypted.get();
        let mut r = self.shared.record();
        r.messages += 1;
        if !self.shared.options.no_save {
            r.received.push(Received { conn: self.n, tls, envelope_from, envelope_to, raw });
        }
        r.events.push(format!("msg {} {}", self.n, if tls { "tls" } else { "plain" }));
        Response::custom(250, "2.0.0 OK queued".into())
    }

    fn auth_plain(&mut self, _authorization_id: &str, authentication_id: &str, password: &str) -> Response {
        self.authenticate(authentication_id, password)
    }

    fn auth_login(&mut self, username: &str, password: &str) -> Response {
        self.authenticate(username, password)
    }
}

/// A test CA and a certificate for `localhost` signed by it, as PEM files in `dir`:
/// returns (CA certificate PEM, chain file, key file).
pub fn test_certificates(dir: &Path) -> (Vec<u8>, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "notifd test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server certificate");
    let chain = dir.join("server.pem");
    let key_file = dir.join("server.key");
    std::fs::write(&chain, cert.pem()).expect("write chain");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    (ca.pem().into_bytes(), chain, key_file)
}
