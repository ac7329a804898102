//! A real SMTP server for tests: Python's aiosmtpd running `tests/util/smtp_server.py` on
//! a free loopback port, one per test, stopped when the value is dropped.
//!
//! `NOTIFD_TEST_PYTHON` names the interpreter (default `python3`); it needs the aiosmtpd
//! package (`python3 -m pip install aiosmtpd`).

#![allow(dead_code)] // each test file uses a different part

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
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
    /// Require AUTH with this user and password.
    pub auth: Option<(String, String)>,
    /// Count messages without saving them.
    pub no_save: bool,
    /// Listen on this port (0: one the kernel chooses), e.g. to bring back a relay that
    /// was down.
    pub port: u16,
}

/// A running server; its folder holds `events.log`, the saved messages and its stderr.
pub struct SmtpServer {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The loopback port it listens on (127.0.0.1).
    pub port: u16,
    /// Its folder.
    pub dir: tempfile::TempDir,
}

/// One message as the server received it.
pub struct Received {
    /// The connection (counted from 1) it came on.
    pub conn: u32,
    /// Whether that connection was encrypted with STARTTLS.
    pub tls: bool,
    /// `MAIL FROM` and `RCPT TO`.
    pub envelope_from: String,
    pub envelope_to: Vec<String>,
    /// The message bytes after the DATA command, dot-unstuffed.
    pub raw: Vec<u8>,
}

impl SmtpServer {
    pub fn start(options: Options) -> SmtpServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/util/smtp_server.py");
        let python = std::env::var("NOTIFD_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(&python);
        cmd.arg(&script).arg("--dir").arg(dir.path()).arg("--tempfail").arg(options.tempfail.to_string());
        if let Some(s) = &options.reject_rcpt {
            cmd.arg("--reject-rcpt").arg(s);
        }
        if let Some(s) = &options.defer_rcpt {
            cmd.arg("--defer-rcpt").arg(s);
        }
        if let Some((cert, key)) = &options.tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        if options.max_per_conn > 0 {
            cmd.arg("--max-per-conn").arg(options.max_per_conn.to_string());
        }
        if options.implicit_tls {
            cmd.arg("--implicit-tls");
        }
        if let Some((user, password)) = &options.auth {
            cmd.arg("--auth").arg(format!("{user}:{password}"));
        }
        if options.no_save {
            cmd.arg("--no-save");
        }
        if options.port != 0 {
            cmd.arg("--port").arg(options.port.to_string());
        }
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr file");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python} {}: {e}", script.display()));
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let mut server = SmtpServer { child, stdin, port: 0, dir };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with("PORT ") => {
                server.port = line[5..].trim().parse().expect("port number");
            }
            other => panic!(
                "the SMTP server did not start ({other:?}); is aiosmtpd installed for {python}?\n{}",
                server.stderr()
            ),
        }
        server
    }

    /// Lines of `events.log` so far.
    pub fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("events.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.events().iter().filter(|l| l.starts_with("conn ")).count()
    }

    /// Messages accepted so far (saved or not).
    pub fn message_count(&self) -> usize {
        self.events().iter().filter(|l| l.starts_with("msg ")).count()
    }

    /// The saved messages, in the order they were accepted.
    pub fn received(&self) -> Vec<Received> {
        self.events()
            .iter()
            .filter_map(|l| l.strip_prefix("msg "))
            .map(|l| {
                let parts: Vec<&str> = l.split(' ').collect();
                let mut bytes = Vec::new();
                std::fs::File::open(self.dir.path().join(parts[1]))
                    .and_then(|mut f| f.read_to_end(&mut bytes))
                    .expect("saved message");
                let mut envelope_from = String::new();
                let mut envelope_to = Vec::new();
                let mut at = 0;
                while let Some(end) = bytes[at..].windows(2).position(|w| w == b"\r\n") {
                    let line = String::from_utf8_lossy(&bytes[at..at + end]).into_owned();
                    if let Some(v) = line.strip_prefix("X-Envelope-From: ") {
                        envelope_from = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("X-Envelope-To: ") {
                        envelope_to.push(v.to_owned());
                    } else {
                        break;
                    }
                    at += end + 2;
                }
                Received {
                    conn: parts[0].parse().expect("connection number"),
                    tls: parts[2] == "tls",
                    envelope_from,
                    envelope_to,
                    raw: bytes[at..].to_vec(),
                }
            })
            .collect()
    }

    /// What the server wrote on stderr, for failure messages.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        // Closing stdin asks it to stop; kill makes sure, and wait reaps it.
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
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
