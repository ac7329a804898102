//! notif(1): the command-line client of notifd.
//!
//! Blocking std::net, one connection at a time; self-contained (it does not use the
//! notifd library crate), so it builds and behaves the same whatever the daemon's
//! internals become. It speaks only what PROTOCOL.md promises: a greeting line, then
//! replies in command order, with `MSG` lines possibly in between.
//!
//! With `--tls` the same lines go through rustls (the ring provider, as the daemon's),
//! the server's certificate checked against its name and the system's roots or `--ca`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::collections::BTreeMap;
use std::env;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DEFAULT_PORT: u16 = 7600;
const DEFAULT_TLS_PORT: u16 = 7643;
/// Offered, not required: a server without ALPN (a TLS proxy in front of notifd) is fine.
const ALPN: &[u8] = b"notifd/1";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than the server's default `store_timeout` (5 s), so that a slow commit ends in
/// the server's `-ERR UNAVAILABLE` rather than in our own timeout.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// The delay before the second try after a drop; the first comes at once.
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

const EXIT_OK: u8 = 0;
const EXIT_SERVER_ERR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CONNECT: u8 = 3;

const USAGE: &str = "usage: notif [-h] [-H host] [-p port] [-a token]
             [--tls [--ca file] [--cert file --key file]] command [argument ...]
commands:
  sub [STREAM-OPTIONS] EMAIL EVENT...
                       subscribe EMAIL to each EVENT and print notifications as they arrive
  watch [STREAM-OPTIONS] EVENT...
                       print notifications of each EVENT as they arrive (nothing stored)
  unsub EVENT EMAIL [CODE]
                       unsubscribe EMAIL from EVENT (CODE: the one in its emails)
  confirm EMAIL CODE   confirm EMAIL's pending subscriptions with the code emailed to it,
                       and print how many were confirmed
  pub EVENT TEXT...    publish TEXT to EVENT and print the notification id
  list EMAIL           print the events EMAIL is subscribed to, with the time of subscription
                       (and \"pending\" while not confirmed)
  ping [TEXT...]       check that the server answers
  stats                print the server's counters, one \"NAME VALUE\" a line
stream options (sub, watch; after a drop both resume from the last id printed):
  --since ID           start after notification ID (0: everything the server keeps)
  --state FILE         keep the last id of each event in FILE, across runs
  --json               print one JSON object per line, with event, id and text";

/// Why a command did not complete; each maps to one exit status.
#[derive(Debug)]
enum Failure {
    /// Bad command line (exit 2).
    Usage(String),
    /// The server answered `-ERR ...` (exit 1); holds the server's line.
    Server(String),
    /// No connection, a lost connection, or a peer that is not notifd (exit 3).
    Connect(String),
    /// Standard output was closed (e.g. `notif sub ... | head -1`): stop quietly.
    StdoutClosed,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(s) | Failure::Connect(s) => f.write_str(s),
            Failure::Server(line) => write!(f, "server: {line}"),
            Failure::StdoutClosed => f.write_str("standard output closed"),
        }
    }
}

struct Options {
    host: String,
    port: u16,
    token: Option<String>,
    /// `Some` with `--tls`.
    tls: Option<TlsOptions>,
    command: String,
    args: Vec<String>,
}

/// What `--tls`, `--ca`, `--cert` and `--key` asked for; the files are read later, once,
/// by [`tls_config`].
#[derive(Debug, Default, PartialEq)]
struct TlsOptions {
    /// The only CA trusted; `None`: the system's roots.
    ca: Option<PathBuf>,
    /// A client certificate chain and its key, presented when the server asks.
    identity: Option<(PathBuf, PathBuf)>,
}

fn main() -> ExitCode {
    let opts = match parse_args(env::args_os().skip(1), |name| env::var(name).ok()) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::from(EXIT_OK);
        }
        Err(msg) => {
            eprintln!("notif: {msg}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match try_main(&opts) {
        Ok(()) | Err(Failure::StdoutClosed) => ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!("notif: {e}");
            ExitCode::from(match e {
                Failure::Usage(_) => EXIT_USAGE,
                Failure::Server(_) => EXIT_SERVER_ERR,
                Failure::Connect(_) => EXIT_CONNECT,
                Failure::StdoutClosed => EXIT_OK,
            })
        }
    }
}

/// `Ok(None)` means help was asked for. `argv` is the command line without the program
/// name; `env` looks up the `NOTIF_*` variables, the defaults the options override.
/// Options end at the command: what follows it is its arguments, dashes and all.
fn parse_args(
    argv: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Options>, String> {
    use lexopt::Arg::{Long, Short, Value};
    let mut host = env("NOTIF_HOST").unwrap_or_else(|| "localhost".into());
    // The default port depends on --tls, which may come after -p.
    let mut port = match env("NOTIF_PORT") {
        Some(p) => Some(parse_port(&p).map_err(|e| format!("NOTIF_PORT: {e}"))?),
        None => None,
    };
    let mut tls = false;
    let (mut ca, mut cert, mut key) = (None, None, None);
    let mut token = env("NOTIF_TOKEN").filter(|t| !t.is_empty());
    let mut parser = lexopt::Parser::from_args(argv);
    // As getopt(3): `-aTOKEN` takes TOKEN whole, even when it starts with `=`.
    parser.set_short_equals(false);
    let mut words = Vec::new();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Short(flag @ ('H' | 'p' | 'a')) => {
                let value = parser.value().map_err(|_| format!("option -{flag} needs a value"))?;
                let value = utf8(value)?;
                match flag {
                    'H' => host = value,
                    'p' => port = Some(parse_port(&value)?),
                    _ => token = Some(value),
                }
            }
            Long("tls") => tls = true,
            Long(name @ ("ca" | "cert" | "key")) => {
                let slot = match name {
                    "ca" => &mut ca,
                    "cert" => &mut cert,
                    _ => &mut key,
                };
                let name = name.to_owned();
                let value = parser.value().map_err(|_| format!("option --{name} needs a value"))?;
                *slot = Some(PathBuf::from(utf8(value)?));
            }
            Short(other) => return Err(format!("unknown option -{other}")),
            Long(other) => return Err(format!("unknown option --{other}")),
            Value(command) => {
                words.push(utf8(command)?);
                for w in parser.raw_args().map_err(|e| e.to_string())? {
                    words.push(utf8(w)?);
                }
                break;
            }
        }
    }
    let mut words = words.into_iter();
    let Some(name) = words.next() else {
        return Err("no command given".into());
    };
    let args: Vec<String> = words.collect();
    let command = name.to_ascii_lowercase();
    let arity_ok = match command.as_str() {
        "sub" => args.len() >= 2,
        "watch" => !args.is_empty(),
        "pub" => args.len() >= 2,
        "list" => args.len() == 1,
        "unsub" => args.len() == 2 || args.len() == 3,
        "confirm" => args.len() == 2,
        "ping" => true,
        "stats" => args.is_empty(),
        _ => return Err(format!("unknown command {name:?}")),
    };
    if !arity_ok {
        return Err(format!("wrong number of arguments for {command}"));
    }
    // A line break inside an argument would smuggle a second command onto the wire.
    if args.iter().any(|a| a.contains(['\n', '\r'])) {
        return Err("arguments must not contain line breaks".into());
    }
    if let Some(t) = &token {
        if t.contains(['\n', '\r', ' ', '\t']) || t.is_empty() {
            return Err("the token must be one word".into());
        }
    }
    if host.is_empty() {
        return Err("empty host".into());
    }
    let tls = match (tls, ca, cert, key) {
        (false, None, None, None) => None,
        (false, ..) => return Err("--ca, --cert and --key need --tls".into()),
        (true, _, Some(_), None) => return Err("--cert needs --key".into()),
        (true, _, None, Some(_)) => return Err("--key needs --cert".into()),
        (true, ca, cert, key) => Some(TlsOptions { ca, identity: cert.zip(key) }),
    };
    let port = port.unwrap_or(if tls.is_some() { DEFAULT_TLS_PORT } else { DEFAULT_PORT });
    Ok(Some(Options { host, port, token, tls, command, args }))
}

fn utf8(arg: OsString) -> Result<String, String> {
    arg.into_string().map_err(|a| format!("{:?}: arguments must be UTF-8", a.to_string_lossy()))
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("bad port {s:?}")),
    }
}

fn try_main(opts: &Options) -> Result<(), Failure> {
    // Read once: `sub`'s reconnections reuse it.
    let tls = opts.tls.as_ref().map(tls_config).transpose()?;
    let tls = tls.as_ref();
    match opts.command.as_str() {
        "sub" | "watch" => {
            let follow = Follow::from_args(opts.command == "watch", &opts.args).map_err(Failure::Usage)?;
            subscribe_forever(opts, tls, follow)
        }
        "pub" => {
            let text = opts.args[1..].join(" ");
            if text.trim().is_empty() {
                return Err(Failure::Usage("empty text".into()));
            }
            let mut conn = Connection::open(opts, tls)?;
            conn.send(&format!("PUB {} {}", opts.args[0], text))?;
            let reply = conn.reply()?;
            // +OK PUB <id> <n>
            let id = reply.split_whitespace().nth(2).unwrap_or("");
            print_line(id)?;
            conn.quit();
            Ok(())
        }
        "list" => {
            let mut conn = Connection::open(opts, tls)?;
            conn.send(&format!("LIST {}", opts.args[0]))?;
            loop {
                let line = conn.line()?;
                if is_ok(&line) {
                    break;
                }
                if is_err(&line) {
                    return Err(Failure::Server(line));
                }
                // SUB <event> <email> <timestamp> [pending]
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() == 4 && f[0] == "SUB" {
                    print_line(&format!("{} {}", f[1], f[3]))?;
                } else if f.len() == 5 && f[0] == "SUB" && f[4] == "pending" {
                    print_line(&format!("{} {} pending", f[1], f[3]))?;
                }
            }
            conn.quit();
            Ok(())
        }
        "unsub" => {
            let mut conn = Connection::open(opts, tls)?;
            conn.send(&format!("UNSUB {}", opts.args.join(" ")))?;
            if conn.reply()?.ends_with(" live") {
                // An untrusted connection cannot stop a confirmed subscription without its code.
                eprintln!("notif: a confirmed subscription stays: give the code from one of its emails, or -a TOKEN");
            }
            conn.quit();
            Ok(())
        }
        "confirm" => {
            let mut conn = Connection::open(opts, tls)?;
            conn.send(&format!("CONFIRM {} {}", opts.args[0], opts.args[1]))?;
            // +OK CONFIRM <n>
            let reply = conn.reply()?;
            print_line(reply.split_whitespace().nth(2).unwrap_or(""))?;
            conn.quit();
            Ok(())
        }
        "ping" => {
            let mut conn = Connection::open(opts, tls)?;
            let cmd = if opts.args.is_empty() {
                "PING".to_string()
            } else {
                format!("PING {}", opts.args.join(" "))
            };
            conn.send(&cmd)?;
            let reply = conn.reply()?;
            print_line(&reply)?;
            conn.quit();
            Ok(())
        }
        "stats" => {
            let mut conn = Connection::open(opts, tls)?;
            conn.send("STATS")?;
            // STAT <name> <value> lines, then +OK STATS <count>.
            let mut line = conn.reply()?;
            while let Some(stat) = line.strip_prefix("STAT ") {
                print_line(stat)?;
                line = conn.reply()?;
            }
            if !is_ok(&line) {
                return Err(Failure::Connect(format!("unexpected reply to STATS: {line:?}")));
            }
            conn.quit();
            Ok(())
        }
        other => Err(Failure::Usage(format!("unknown command {other}"))),
    }
}

/// The client's TLS configuration: TLS 1.2 and 1.3, the roots of `--ca` or else the
/// system's, and the client certificate of `--cert` and `--key`. A file that cannot be
/// used is a usage error (exit 2), as a bad option value is.
fn tls_config(tls: &TlsOptions) -> Result<Arc<ClientConfig>, Failure> {
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            for cert in read_certs(ca, "--ca")? {
                roots.add(cert).map_err(|e| file_error(ca, "--ca", &format!("not a CA certificate: {e}")))?;
            }
        }
        None => {
            // SSL_CERT_FILE and SSL_CERT_DIR override the system's, as for OpenSSL.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(Failure::Usage(format!(
                    "no trusted certificates found on this system{why}: give the server's CA with --ca"
                )));
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Usage(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert, "--cert")?;
            let pem = read_file(key, "--key")?;
            let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    file_error(key, "--key", "no PEM private key in it")
                }
                e => file_error(key, "--key", &format!("not a PEM file: {e}")),
            })?;
            builder.with_client_auth_cert(chain, der).map_err(|e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => file_error(
                    key,
                    "--key",
                    &format!("does not match the certificate of --cert {}", cert.display()),
                ),
                e => {
                    file_error(key, "--key", &format!("not a usable key for --cert {}: {e}", cert.display()))
                }
            })?
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Every certificate of the PEM file given to `option`; at least one.
fn read_certs(path: &Path, option: &str) -> Result<Vec<CertificateDer<'static>>, Failure> {
    let pem = read_file(path, option)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, option, &format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, option, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn read_file(path: &Path, option: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| file_error(path, option, &format!("cannot read: {e}")))
}

fn file_error(path: &Path, option: &str, why: &str) -> Failure {
    Failure::Usage(format!("{option} {}: {why}", path.display()))
}

/// The byte stream under the protocol: the socket itself, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    /// Connects, and with `tls` completes the handshake, checking the server's
    /// certificate against `host`.
    fn open(host: &str, port: u16, tls: Option<&Arc<ClientConfig>>) -> Result<(Stream, SocketAddr), Failure> {
        let sock = connect(host, port)?;
        let peer = sock.peer_addr().map_err(|e| Failure::Connect(e.to_string()))?;
        let _ = sock.set_nodelay(true);
        let Some(config) = tls else {
            let _ = sock.set_read_timeout(Some(REPLY_TIMEOUT));
            return Ok((Stream::Plain(sock), peer));
        };
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|_| Failure::Usage(format!("{host:?} cannot be checked against a certificate")))?;
        let mut tls = ClientConnection::new(config.clone(), name)
            .map_err(|e| Failure::Connect(format!("{peer}: TLS: {e}")))?;
        let mut sock = sock;
        // The handshake is part of connecting: bounded as connecting is, not as a reply.
        let _ = sock.set_read_timeout(Some(CONNECT_TIMEOUT));
        while tls.is_handshaking() {
            tls.complete_io(&mut sock).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    Failure::Connect(format!("{peer}: TLS handshake: no answer in time"))
                }
                io::ErrorKind::UnexpectedEof => {
                    Failure::Connect(format!("{peer}: TLS handshake: connection closed (not a TLS port?)"))
                }
                // What a plain-text greeting looks like to TLS.
                _ if matches!(
                    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
                    Some(rustls::Error::InvalidMessage(_))
                ) =>
                {
                    Failure::Connect(format!("{peer}: TLS handshake: {e} (not a TLS port?)"))
                }
                _ => Failure::Connect(format!("{peer}: TLS handshake: {e}")),
            })?;
        }
        let _ = sock.set_read_timeout(Some(REPLY_TIMEOUT));
        Ok((Stream::Tls(Box::new(StreamOwned::new(tls, sock))), peer))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }

    /// No more writes: TLS's close_notify first, then the socket's FIN.
    fn shutdown_write(&mut self) {
        if let Stream::Tls(s) = self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One connection to the server, past its greeting (and AUTH, when a token is given).
struct Connection {
    reader: BufReader<Stream>,
    peer: SocketAddr,
    /// The words of the greeting's `abilities=` token.
    abilities: Vec<String>,
}

impl Connection {
    fn open(opts: &Options, tls: Option<&Arc<ClientConfig>>) -> Result<Connection, Failure> {
        let (stream, peer) = Stream::open(&opts.host, opts.port, tls)?;
        let mut conn = Connection { reader: BufReader::new(stream), peer, abilities: Vec::new() };
        let greeting = conn.line()?;
        if is_err(&greeting) {
            // -ERR BUSY: the server is full or shutting down.
            return Err(Failure::Server(greeting));
        }
        if !greeting.starts_with("HELLO notifd ") {
            return Err(Failure::Connect(format!("{peer}: not a notifd server (greeting {greeting:?})")));
        }
        if let Some(list) = greeting.split(' ').find_map(|w| w.strip_prefix("abilities=")) {
            conn.abilities = list.split(',').map(str::to_string).collect();
        }
        if let Some(token) = &opts.token {
            conn.send(&format!("AUTH {token}"))?;
            conn.reply()?;
        }
        Ok(conn)
    }

    fn send(&mut self, line: &str) -> Result<(), Failure> {
        let mut buf = Vec::with_capacity(line.len() + 2);
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\r\n");
        self.write(&buf)
    }

    /// Writes and flushes: a TLS stream holds bytes in its record layer until then.
    fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let peer = self.peer;
        let out = self.reader.get_mut();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| Failure::Connect(format!("{peer}: write: {e}")))
    }

    /// The next line from the server, without its CRLF.
    fn line(&mut self) -> Result<String, Failure> {
        let mut buf = Vec::new();
        let peer = self.peer;
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(0) => Err(Failure::Connect(format!("{peer}: connection closed"))),
            Ok(_) if !buf.ends_with(b"\n") => Err(Failure::Connect(format!("{peer}: connection closed"))),
            Ok(_) => {
                buf.pop();
                if buf.ends_with(b"\r") {
                    buf.pop();
                }
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                Err(Failure::Connect(format!("{peer}: no reply in time")))
            }
            // TLS's word for a close without close_notify.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(Failure::Connect(format!("{peer}: connection closed")))
            }
            Err(e) => Err(Failure::Connect(format!("{peer}: read: {e}"))),
        }
    }

    /// The reply to the oldest command still unanswered; `MSG` lines before it are
    /// skipped (one-shot commands never subscribe, but a server may be generous).
    fn reply(&mut self) -> Result<String, Failure> {
        loop {
            let line = self.line()?;
            if line.starts_with("MSG ") {
                continue;
            }
            if is_err(&line) {
                return Err(Failure::Server(line));
            }
            return Ok(line);
        }
    }

    /// Polite goodbye; errors are of no interest any more.
    fn quit(mut self) {
        if self.send("QUIT").is_ok() {
            self.reader.get_mut().shutdown_write();
            let _ = self.reader.get_ref().tcp().set_read_timeout(Some(Duration::from_secs(2)));
            while let Ok(line) = self.line() {
                if line.starts_with("+OK QUIT") {
                    break;
                }
            }
        }
    }
}

fn is_ok(line: &str) -> bool {
    line == "+OK" || line.starts_with("+OK ")
}

fn is_err(line: &str) -> bool {
    line == "-ERR" || line.starts_with("-ERR ")
}

/// Resolves (host, port) and tries each address in turn, as `ToSocketAddrs` lists
/// them; so `-H ::1`, `-H 127.0.0.1` and host names all work.
fn connect(host: &str, port: u16) -> Result<TcpStream, Failure> {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let addrs: Vec<SocketAddr> =
        (host, port).to_socket_addrs().map_err(|e| Failure::Connect(format!("{host}: {e}")))?.collect();
    let mut last = format!("{host}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("connect to {addr}: {e}"),
        }
    }
    Err(Failure::Connect(last))
}

fn print_line(s: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(out, "{s}").and_then(|()| out.flush()).map_err(|_| Failure::StdoutClosed)
}

/// What `sub` and `watch` follow, and the last id printed for each event.
struct Follow {
    /// `None` for `watch`.
    email: Option<String>,
    events: Vec<String>,
    /// The last id printed per event; a reconnection asks for what came after it.
    last: BTreeMap<String, u64>,
    /// Where `last` is kept across runs.
    state: Option<PathBuf>,
    /// `last` changed since the state file was written.
    unsaved: bool,
    json: bool,
}

impl Follow {
    /// `[--since ID] [--state FILE] [--json] [EMAIL] EVENT...`
    fn from_args(watch: bool, args: &[String]) -> Result<Follow, String> {
        let (mut since, mut state, mut json) = (None, None, false);
        let mut rest = args;
        while let Some(first) = rest.first() {
            let take_value = |rest: &[String]| -> Result<String, String> {
                rest.get(1).cloned().ok_or_else(|| format!("option {first} needs a value"))
            };
            match first.as_str() {
                "--since" => {
                    let v = take_value(rest)?;
                    since = Some(parse_id(&v).ok_or_else(|| format!("bad id {v:?} for --since"))?);
                    rest = &rest[2..];
                }
                "--state" => {
                    state = Some(PathBuf::from(take_value(rest)?));
                    rest = &rest[2..];
                }
                "--json" => {
                    json = true;
                    rest = &rest[1..];
                }
                "--" => {
                    rest = &rest[1..];
                    break;
                }
                o if o.starts_with("--") => return Err(format!("unknown option {o}")),
                _ => break,
            }
        }
        let (email, events) = if watch {
            (None, rest.to_vec())
        } else {
            match rest.split_first() {
                Some((email, events)) => (Some(email.clone()), events.to_vec()),
                None => (None, Vec::new()),
            }
        };
        if events.is_empty() {
            return Err(format!("wrong number of arguments for {}", if watch { "watch" } else { "sub" }));
        }
        let mut last = BTreeMap::new();
        if let Some(id) = since {
            for ev in &events {
                last.insert(ev.clone(), id);
            }
        }
        if let Some(path) = &state {
            // The file knows better than --since: it is where an earlier run stopped.
            last.extend(read_state(path)?.into_iter().filter(|(ev, _)| events.contains(ev)));
        }
        Ok(Follow { email, events, last, state, unsaved: false, json })
    }

    /// The command that starts the live part of `event`, with SINCE the last id
    /// printed when the server can replay.
    fn command(&self, event: &str, can_replay: bool) -> String {
        let mut line = match &self.email {
            Some(email) => format!("SUB {event} {email}"),
            None => format!("WATCH {event}"),
        };
        if let (true, Some(id)) = (can_replay, self.last.get(event)) {
            line.push_str(&format!(" SINCE {id}"));
        }
        line.push_str("\r\n");
        line
    }

    /// Handles one line that is not a reply: `MSG` is printed, `GAP` told on stderr.
    fn show(&mut self, line: &str) -> Result<(), Failure> {
        if let Some(rest) = line.strip_prefix("MSG ") {
            let mut f = rest.splitn(3, ' ');
            let (event, id, text) = (f.next().unwrap_or(""), f.next().unwrap_or(""), f.next().unwrap_or(""));
            if self.json {
                print_line(&format!(
                    "{{\"event\":{},\"id\":{},\"text\":{}}}",
                    json_string(event),
                    id.parse::<u64>().map_or_else(|_| json_string(id), |n| n.to_string()),
                    json_string(text)
                ))?;
            } else {
                print_line(rest)?;
            }
            if let Some(id) = parse_id(id) {
                let last = self.last.entry(event.to_string()).or_insert(0);
                *last = (*last).max(id);
                self.unsaved = true;
            }
        } else if let Some(rest) = line.strip_prefix("GAP ") {
            let f: Vec<&str> = rest.split(' ').collect();
            if let [event, from, to] = f[..] {
                eprintln!(
                    "notif: GAP {event} {from} {to}: notifications {from} to {to} are no longer kept; \
                     those of {event} among them are lost"
                );
            }
        }
        Ok(())
    }

    /// Writes the state file if something was printed since; called when no more input
    /// is buffered, so a busy stream is not written at every line.
    fn save(&mut self) {
        if !self.unsaved {
            return;
        }
        self.unsaved = false;
        if let Some(path) = &self.state {
            if let Err(e) = write_state(path, &self.last) {
                eprintln!("notif: cannot write {}: {e}", path.display());
            }
        }
    }
}

/// A notification id: digits only, 0 to 2^63 − 1.
fn parse_id(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|&n| n <= i64::MAX as u64)
}

/// The state file: one `EVENT ID` line per event. A missing file is an empty state.
fn read_state(path: &Path) -> Result<BTreeMap<String, u64>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut last = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next().and_then(parse_id), f.next()) {
            (None, _, _) => {}
            (Some(ev), Some(id), None) => {
                last.insert(ev.to_string(), id);
            }
            _ => return Err(format!("{}:{}: expected \"EVENT ID\"", path.display(), n + 1)),
        }
    }
    Ok(last)
}

/// Writes the state file atomically: a temporary file beside it, synced, renamed over it.
fn write_state(path: &Path, last: &BTreeMap<String, u64>) -> io::Result<()> {
    let mut text = String::new();
    for (ev, id) in last {
        text.push_str(&format!("{ev} {id}\n"));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `s` as a JSON string, quotes included.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `sub` and `watch`: start the live part of every event, print every notification,
/// and when the connection drops, come back and resume each event after the last id
/// printed: the first try at once, then with growing, jittered delays. Only the first
/// connection's failures end the program; after that it keeps trying.
fn subscribe_forever(
    opts: &Options,
    tls: Option<&Arc<ClientConfig>>,
    mut stream: Follow,
) -> Result<(), Failure> {
    let mut conn = Connection::open(opts, tls)?;
    subscribe(&mut conn, &mut stream, true)?;
    let mut seed = jitter_seed();
    loop {
        let since = Instant::now();
        let why = match receive(&mut conn, &mut stream) {
            Ok(()) => unreachable!("receive returns only on failure"),
            Err(Failure::StdoutClosed) => return Ok(()),
            Err(e) => e,
        };
        stream.save();
        eprintln!("notif: connection lost ({why}); reconnecting");
        let mut delay = RECONNECT_FIRST;
        if since.elapsed() < Duration::from_secs(1) {
            // Dropped again at once: do not hammer a server that keeps failing.
            thread::sleep(jittered(RECONNECT_FIRST, &mut seed));
        }
        conn = loop {
            let attempt = Connection::open(opts, tls).and_then(|mut c| {
                subscribe(&mut c, &mut stream, false)?;
                Ok(c)
            });
            let failed = match attempt {
                Ok(c) => {
                    eprintln!("notif: reconnected to {}, resumed {} event(s)", c.peer, stream.events.len());
                    break c;
                }
                Err(Failure::StdoutClosed) => return Ok(()),
                // A refused event or address will not get better by retrying.
                Err(Failure::Server(line)) if !retryable(&line) => {
                    return Err(Failure::Server(line));
                }
                Err(e) => e,
            };
            let wait = jittered(delay, &mut seed);
            eprintln!("notif: reconnect failed ({failed}); retrying in {:.1}s", wait.as_secs_f64());
            thread::sleep(wait);
            delay = (delay * 2).min(RECONNECT_MAX);
        };
    }
}

/// `-ERR BUSY` (full, shutting down) and `-ERR UNAVAILABLE` (the database) are
/// passing states of the server; the others describe our request.
fn retryable(line: &str) -> bool {
    line.starts_with("-ERR BUSY") || line.starts_with("-ERR UNAVAILABLE")
}

/// Sends every SUB or WATCH at once (pipelined) and waits for their replies, printing
/// any notification that arrives meanwhile (the live part starts before the `+OK`).
fn subscribe(conn: &mut Connection, stream: &mut Follow, first: bool) -> Result<(), Failure> {
    let can_replay = conn.abilities.iter().any(|a| a == "since");
    if stream.email.is_none() && !conn.abilities.iter().any(|a| a == "watch") {
        return Err(Failure::Server(format!("{}: this server does not know WATCH", conn.peer)));
    }
    let batch: String = stream.events.iter().map(|ev| stream.command(ev, can_replay)).collect();
    conn.write(batch.as_bytes())?;
    let mut acked = 0;
    let mut told = !first;
    while acked < stream.events.len() {
        let line = conn.line()?;
        if is_ok(&line) {
            acked += 1;
            if !told && line.ends_with(" pending") {
                told = true;
                if let Some(email) = &stream.email {
                    eprintln!("pending: check {email} for a confirmation message");
                }
            }
        } else if line.starts_with("-ERR UNAVAILABLE") && !first {
            // The live subscription stays; the stored one is already there from before.
            eprintln!("notif: {line}");
            acked += 1;
        } else if is_err(&line) {
            return Err(Failure::Server(line));
        } else {
            stream.show(&line)?;
        }
    }
    // Subscribers idle for hours: no read timeout, but TCP keepalive notices a dead peer.
    let sock = conn.reader.get_ref().tcp();
    let _ = sock.set_read_timeout(None);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = socket2::SockRef::from(sock).set_tcp_keepalive(&ka);
    Ok(())
}

/// Prints notifications until the connection ends; always returns an error.
fn receive(conn: &mut Connection, stream: &mut Follow) -> Result<(), Failure> {
    loop {
        if conn.reader.buffer().is_empty() {
            // About to wait for the network: a good moment to write the state.
            stream.save();
        }
        let line = conn.line()?;
        if is_err(&line) {
            // `-ERR BUSY shutting down`, `-ERR BUSY slow consumer`: the server closes next.
            return Err(Failure::Connect(format!("server said {line}")));
        }
        stream.show(&line)?;
    }
}

fn jitter_seed() -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32) | 1
}

/// `delay` scaled by a factor in [0.75, 1.25), so that many subscribers cut off at once
/// do not all come back in the same instant.
fn jittered(delay: Duration, seed: &mut u64) -> Duration {
    // xorshift64
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let f = 0.75 + (*seed % 1000) as f64 / 2000.0;
    delay.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Option<Options>, String> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        parse_args(args.iter().map(OsString::from), |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    fn parse(args: &[&str]) -> Result<Options, String> {
        parse_env(args, &[]).map(|o| o.expect("not help"))
    }

    #[test]
    fn defaults() {
        let o = parse(&["ping"]).unwrap();
        assert_eq!((o.host.as_str(), o.port, o.token), ("localhost", DEFAULT_PORT, None));
        assert_eq!(o.command, "ping");
        assert!(o.args.is_empty());
    }

    #[test]
    fn options_separate_and_attached() {
        let o = parse(&["-H", "::1", "-p", "7601", "-a", "secret", "list", "a@example.com"]).unwrap();
        assert_eq!((o.host.as_str(), o.port, o.token.as_deref()), ("::1", 7601, Some("secret")));
        assert_eq!((o.command.as_str(), o.args.as_slice()), ("list", &["a@example.com".to_string()][..]));
        let o = parse(&["-H[::1]", "-p7602", "-asecret", "PING"]).unwrap();
        assert_eq!((o.host.as_str(), o.port, o.token.as_deref()), ("[::1]", 7602, Some("secret")));
        assert_eq!(o.command, "ping");
        // A value is taken whole, even when it looks like an option.
        assert_eq!(parse(&["-H", "-p", "ping"]).unwrap().host, "-p");
    }

    #[test]
    fn options_end_at_the_command() {
        let o = parse(&["pub", "ev", "-x", "--", "-h"]).unwrap();
        assert_eq!(o.args, ["ev", "-x", "--", "-h"]);
        let o = parse(&["--", "ping", "-p"]).unwrap();
        assert_eq!((o.port, o.args.as_slice()), (DEFAULT_PORT, &["-p".to_string()][..]));
    }

    #[test]
    fn help() {
        assert!(parse_env(&["-h"], &[]).unwrap().is_none());
        assert!(parse_env(&["--help"], &[]).unwrap().is_none());
        assert!(parse_env(&["-p", "1", "-h", "ping"], &[]).unwrap().is_none());
    }

    #[test]
    fn environment_gives_defaults_that_options_override() {
        let env = [("NOTIF_HOST", "h.example"), ("NOTIF_PORT", "7700"), ("NOTIF_TOKEN", "t0ken")];
        let o = parse_env(&["ping"], &env).unwrap().unwrap();
        assert_eq!((o.host.as_str(), o.port, o.token.as_deref()), ("h.example", 7700, Some("t0ken")));
        let o = parse_env(&["-H", "127.0.0.1", "-p", "7601", "-a", "other", "ping"], &env).unwrap().unwrap();
        assert_eq!((o.host.as_str(), o.port, o.token.as_deref()), ("127.0.0.1", 7601, Some("other")));
        assert_eq!(parse_env(&["ping"], &[("NOTIF_TOKEN", "")]).unwrap().unwrap().token, None);
        let e = parse_env(&["ping"], &[("NOTIF_PORT", "x")]).err().unwrap();
        assert!(e.starts_with("NOTIF_PORT: "), "{e}");
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stream_options_and_resume_commands() {
        let s = Follow::from_args(false, &strings(&["--since", "17", "--json", "a@b", "e", "f"])).unwrap();
        assert_eq!((s.email.as_deref(), s.json, s.events.len()), (Some("a@b"), true, 2));
        assert_eq!(s.command("e", true), "SUB e a@b SINCE 17\r\n");
        assert_eq!(s.command("e", false), "SUB e a@b\r\n");
        let mut w = Follow::from_args(true, &strings(&["e"])).unwrap();
        assert_eq!(w.command("e", true), "WATCH e\r\n");
        w.json = true;
        let _ = w.show("GAP e 1 5");
        assert_eq!(w.command("e", true), "WATCH e\r\n", "a GAP is not an id received");
        for (args, want) in [
            (&["--since"][..], "option --since needs a value"),
            (&["--since", "-1", "e"], "bad id \"-1\" for --since"),
            (&["--since", "9223372036854775808", "e"], "bad id \"9223372036854775808\" for --since"),
            (&["--frob", "e"], "unknown option --frob"),
            (&["--json"], "wrong number of arguments for watch"),
        ] {
            assert_eq!(Follow::from_args(true, &strings(args)).err().as_deref(), Some(want), "{args:?}");
        }
        assert!(Follow::from_args(false, &strings(&["a@b"])).is_err());
        // Event names may start with a dash after `--`.
        assert_eq!(Follow::from_args(true, &strings(&["--", "--e"])).unwrap().events, ["--e"]);
    }

    #[test]
    fn state_file_round_trips_and_beats_since() {
        let dir = std::env::temp_dir().join(format!("notif-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let mut last = BTreeMap::new();
        last.insert("e".to_string(), 42u64);
        last.insert("x".to_string(), 7u64);
        write_state(&path, &last).unwrap();
        assert_eq!(read_state(&path).unwrap(), last);
        let p = path.to_str().unwrap();
        let s = Follow::from_args(true, &strings(&["--since", "3", "--state", p, "e", "f"])).unwrap();
        assert_eq!(s.command("e", true), "WATCH e SINCE 42\r\n");
        assert_eq!(s.command("f", true), "WATCH f SINCE 3\r\n");
        assert!(!s.last.contains_key("x"), "an event not followed is left out");
        std::fs::write(&path, "e 1 2\n").unwrap();
        assert!(read_state(&path).unwrap_err().contains(":1: expected"));
        assert!(read_state(&dir.join("missing")).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a \"b\" \\ c\td\u{1}é"), "\"a \\\"b\\\" \\\\ c\\td\\u0001é\"");
        assert_eq!(json_string(""), "\"\"");
    }

    #[test]
    fn tls_options() {
        let o = parse(&["--tls", "ping"]).unwrap();
        assert_eq!((o.port, o.tls), (DEFAULT_TLS_PORT, Some(TlsOptions::default())));
        assert_eq!(parse(&["-p", "7000", "--tls", "ping"]).unwrap().port, 7000);
        assert_eq!(parse_env(&["--tls", "ping"], &[("NOTIF_PORT", "7700")]).unwrap().unwrap().port, 7700);
        let o = parse(&["--tls", "--ca", "ca.pem", "--cert=me.pem", "--key", "me.key", "ping"]).unwrap();
        let want =
            TlsOptions { ca: Some("ca.pem".into()), identity: Some(("me.pem".into(), "me.key".into())) };
        assert_eq!(o.tls, Some(want));
        assert_eq!(parse(&["ping"]).unwrap().tls, None);
        for (args, want) in [
            (&["--ca", "ca.pem", "ping"][..], "--ca, --cert and --key need --tls"),
            (&["--cert", "c", "--key", "k", "ping"], "--ca, --cert and --key need --tls"),
            (&["--tls", "--cert", "c", "ping"], "--cert needs --key"),
            (&["--tls", "--key", "k", "ping"], "--key needs --cert"),
            (&["--tls", "--ca"], "option --ca needs a value"),
            (&["--tls=yes", "ping"], "unexpected argument for option '--tls'"),
        ] {
            let got = parse(args).err();
            assert!(got.as_deref().is_some_and(|e| e.contains(want)), "{args:?}: {got:?}");
        }
    }

    #[test]
    fn usage_errors_not_panics() {
        for (args, want) in [
            (&["-é"][..], "unknown option -é"),
            (&["-é", "ping"], "unknown option -é"),
            (&["-x", "ping"], "unknown option -x"),
            (&["--port", "1", "ping"], "unknown option --port"),
            (&["-H"], "option -H needs a value"),
            (&["-p", "0", "ping"], "bad port \"0\""),
            (&["-p", "65536", "ping"], "bad port \"65536\""),
            (&[], "no command given"),
            (&["-p", "1"], "no command given"),
            (&["Frob"], "unknown command \"Frob\""),
            (&["-"], "unknown command \"-\""),
            (&["list"], "wrong number of arguments for list"),
            (&["stats", "x"], "wrong number of arguments for stats"),
            (&["unsub", "ev"], "wrong number of arguments for unsub"),
            (&["unsub", "ev", "a@b", "code", "x"], "wrong number of arguments for unsub"),
            (&["confirm", "a@b"], "wrong number of arguments for confirm"),
            (&["pub", "ev", "a\r\nPUB x y"], "arguments must not contain line breaks"),
            (&["-a", "two words", "ping"], "the token must be one word"),
            (&["-H", "", "ping"], "empty host"),
        ] {
            assert_eq!(parse(args).err().as_deref(), Some(want), "{args:?}");
        }
        let bad = OsString::from_vec(b"\xff".to_vec());
        for args in
            [vec![OsString::from("ping"), bad.clone()], vec![OsString::from("-H"), bad.clone()], vec![bad]]
        {
            let e = parse_args(args, |_| None).err().expect("an error");
            assert!(e.ends_with("arguments must be UTF-8"), "{e}");
        }
    }
}
