//! Shared by the black-box tests: start the built daemon with a temporary configuration,
//! follow its log, talk to it over TCP, and stop it (and its children) whatever happens.
//!
//! Every wait here is bounded and waits for an event (a log line, a reply, a file), never
//! for a fixed time: the machines are shared and slow.
//!
//! Also here, so that no test file keeps its own copy: the PUB helpers
//! ([`publish`], [`parse_ok_pub`]), process checks ([`alive`], [`read_pid`], [`wait_until`],
//! [`Cont`]), daemons started with `-d` ([`PidGuard`], [`listen_addr_in`]), a port where
//! nothing listens ([`ClosedPort`]), the RFC 3339 check, the email [`header`] helper, and
//! [`skip`] for a test that cannot run here.

#![allow(dead_code)]
pub mod extra;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long to wait for anything that should happen "soon".
pub const WAIT: Duration = Duration::from_secs(10);

/// The built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_notifd")
}

/// The daemon's stderr, line by line, as it comes.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A running notifd in the foreground, with its own temporary folder.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub port: u16,
    /// Where the daemon listens, as given in its log.
    pub listen: SocketAddr,
    process: Option<Child>,
    log: Arc<Log>,
    /// Logs of earlier runs in the same folder, for the dump on failure.
    earlier: Vec<String>,
    /// The test said the daemon may be gone by the end: see [`Daemon::expect_exit`].
    exit_expected: bool,
}

/// The configuration a test gets unless `extra` sets the key itself.
fn defaults(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("host", "\"127.0.0.1\"".into()),
        ("port", "0".into()),
        ("database", format!("{:?}", dir.join("db/notifd.db").display().to_string())),
        ("spool_dir", format!("{:?}", dir.join("spool").display().to_string())),
        ("mail_transport", "\"none\"".into()),
        ("store_timeout", "30".into()),
        ("log_level", "\"debug\"".into()),
    ]
}

/// Whether the TOML text sets `key` on a line of its own.
fn sets_key(extra: &str, key: &str) -> bool {
    extra.lines().any(|l| {
        let l = l.trim_start();
        l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

/// Writes `notifd.conf` in `dir`: the test defaults, overridden by `extra`.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let mut text = String::new();
    for (k, v) in defaults(dir) {
        if !sets_key(extra, k) {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    text.push_str(extra);
    text.push('\n');
    let conf = dir.join("notifd.conf");
    std::fs::write(&conf, text).expect("write the configuration");
    conf
}

impl Daemon {
    /// Starts notifd with the test defaults plus `extra_config` (TOML lines; a key set
    /// there replaces the default), and waits until it listens.
    pub fn start(extra_config: &str) -> Daemon {
        let dir = tempfile::Builder::new().prefix("notifd-test-").tempdir().expect("temporary folder");
        let conf = write_config(dir.path(), extra_config);
        let mut d = Daemon {
            dir,
            conf,
            port: 0,
            listen: "127.0.0.1:0".parse().unwrap(),
            process: None,
            log: Arc::new(Log::default()),
            earlier: Vec::new(),
            exit_expected: false,
        };
        d.launch();
        d
    }

    /// Starts the daemon again on the same folder and configuration (after `stop` or
    /// `kill_all`), e.g. to check what survived.
    pub fn restart(&mut self) {
        assert!(self.process.is_none(), "restart: the daemon is still running");
        self.earlier.push("---- earlier run ----".into());
        let old = std::mem::take(&mut *self.log.lines.lock().unwrap());
        self.earlier.extend(old);
        self.earlier.push("---- restart ----".into());
        self.log = Arc::new(Log::default());
        self.launch();
    }

    fn launch(&mut self) {
        let mut child = Command::new(bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start notifd");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || collect(stderr, log));
        self.process = Some(child);
        let line = self.wait_log(|l| l.contains("listening on "), WAIT);
        let addr = line.rsplit("listening on ").next().unwrap().trim();
        self.listen = addr.parse().unwrap_or_else(|e| panic!("bad address {addr:?} in the log: {e}"));
        self.port = self.listen.port();
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.process.as_ref().expect("daemon running").id() as i32
    }

    /// Where a client connects by default: the loopback of the listener's family (or
    /// 127.0.0.1 for a wildcard listener).
    pub fn addr(&self) -> SocketAddr {
        match self.listen {
            SocketAddr::V6(a) if a.ip().is_loopback() => self.listen,
            _ => SocketAddr::from(([127, 0, 0, 1], self.port)),
        }
    }

    /// A new client, greeting read.
    pub fn client(&self) -> Client {
        Client::connect(self.addr())
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    /// Whether a log line so far contains `needle`.
    pub fn log_has(&self, needle: &str) -> bool {
        self.log.lines.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// How many log lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until a log line satisfies `pred`; returns the first that does. Panics at
    /// the timeout.
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!("no such log line within {timeout:?}");
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Waits until `n` log lines contain `needle`.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if lines.iter().filter(|l| l.contains(needle)).count() >= n {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!("fewer than {n} log lines with {needle:?} within {timeout:?}");
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// The pids of children the log says were started (`<name> started (pid N)`), in order.
    pub fn child_pids(&self, name: &str) -> Vec<i32> {
        let prefix = format!("{name} started (pid ");
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.split(&prefix).nth(1))
            .filter_map(|rest| rest.trim_end().strip_suffix(')'))
            .filter_map(|n| n.parse().ok())
            .collect()
    }

    /// The pid of the store now running (the last one the log announced).
    pub fn store_pid(&self) -> i32 {
        *self.child_pids("notifd-store").last().expect("the log names the store's pid")
    }

    /// The pids of the mailers the log says were started (`notifd-mailer N started (pid M)`).
    pub fn mailer_pids(&self) -> Vec<i32> {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(": notifd-mailer "))
            .filter_map(|l| l.split(" started (pid ").nth(1))
            .filter_map(|rest| rest.trim_end().strip_suffix(')'))
            .filter_map(|n| n.parse().ok())
            .collect()
    }

    /// Every child pid the log named: stores and mailers.
    pub fn all_child_pids(&self) -> Vec<i32> {
        let mut pids = self.child_pids("notifd-store");
        pids.extend(self.mailer_pids());
        pids
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// Waits (bounded) for the daemon to exit on its own; `None` if it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.process.as_mut().expect("daemon running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.process = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, and the exit status (bounded wait; panics if it does not exit).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(WAIT).expect("the daemon exits within 10 s of SIGTERM")
    }

    /// SIGKILL to the daemon and every child the log named, as a power cut would.
    pub fn kill_all(&mut self) {
        let pid = self.pid();
        let children = self.all_child_pids();
        signal(pid, libc::SIGKILL);
        for c in children {
            kill_if_ours(c, libc::SIGKILL);
        }
        let st = self.wait_exit(WAIT).expect("SIGKILL ends the daemon");
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        for c in self.all_child_pids() {
            wait_gone(c, WAIT);
        }
    }

    /// The collected log as one string.
    pub fn log_text(&self) -> String {
        let mut all = self.earlier.clone();
        all.extend(self.log_lines());
        all.join("\n")
    }

    /// The path of a file in the test's folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The database, opened read-only.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.path("db/notifd.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .expect("open the database read-only")
    }

    /// Says that the daemon is expected to exit on its own before the test ends (a fatal
    /// error the test provokes), so that [`Drop`] does not count its absence as a crash.
    pub fn expect_exit(&mut self) {
        self.exit_expected = true;
    }

    /// Ends the run at the end of a test: the daemon must still be running (unless
    /// [`Daemon::expect_exit`] was called) and must stop cleanly on SIGTERM. Returns what
    /// went wrong, if anything.
    fn finish(&mut self) -> Option<String> {
        let mut child = self.process.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return (!self.exit_expected)
                .then(|| format!("the daemon was no longer running at the end of the test ({st})"));
        }
        signal(child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return None,
                Ok(Some(st)) => {
                    return Some(format!("the daemon exited with {st} on SIGTERM at the end of the test"))
                }
                _ if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Some(format!("the daemon did not exit within {WAIT:?} of SIGTERM"));
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// A test whose daemon crashed, or did not stop cleanly, fails here even if every
/// assertion before passed (a test ending in `expect_eof()` would otherwise pass when the
/// reactor died).
impl Drop for Daemon {
    fn drop(&mut self) {
        let problem = self.finish();
        for c in self.all_child_pids() {
            kill_if_ours(c, libc::SIGKILL);
        }
        let panicking = std::thread::panicking();
        if panicking || problem.is_some() {
            eprintln!(
                "==== notifd log ({}) ====\n{}\n==== end of log ====",
                self.conf.display(),
                self.log_text()
            );
        }
        if let Some(p) = problem {
            if !panicking {
                panic!("{p}");
            }
        }
    }
}

fn collect(stderr: ChildStderr, log: Arc<Log>) {
    let mut r = io::BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match io::BufRead::read_until(&mut r, b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                log.lines.lock().unwrap().push(line);
                log.grew.notify_all();
            }
        }
    }
}

/// kill(2), ignoring errors (the process may be gone).
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill with a positive pid and a valid signal number.
    unsafe { libc::kill(pid, sig) };
}

/// The `comm` of a process, if it exists.
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// The state letter and parent pid from /proc/<pid>/stat.
pub fn stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces, so split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Signals a child pid only while it is still a notifd process: a pid from an old log
/// line may have been reused by something else.
pub fn kill_if_ours(pid: i32, sig: i32) {
    if comm(pid).is_some_and(|c| c.starts_with("notifd")) {
        signal(pid, sig);
    }
}

/// Whether a pid names a live notifd process (not a zombie, not reused).
pub fn alive_notifd(pid: i32) -> bool {
    comm(pid).is_some_and(|c| c.starts_with("notifd")) && stat(pid).is_some_and(|(st, _)| st != 'Z')
}

/// Waits (bounded) until `pid` is no longer a live notifd process.
pub fn wait_gone(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while alive_notifd(pid) {
        assert!(Instant::now() < deadline, "process {pid} still alive after {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pids whose parent is `ppid`.
pub fn children_of(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if stat(pid).is_some_and(|(_, p)| p == ppid) {
            out.push(pid);
        }
    }
    out
}

/// The resident memory of a process, in bytes.
pub fn rss(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Whether this machine has an IPv6 loopback to test with.
pub fn have_ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Polls `cond` until it holds; panics with `what` at the timeout.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a process exists and is not a zombie waiting to be reaped.
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|(st, _)| st != 'Z')
}

/// The pid in a pid file, if the file exists and holds one.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Resumes a stopped process when dropped, so a failing test does not leave it stopped.
pub struct Cont(pub i32);

impl Drop for Cont {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// SIGSTOP to `pid`; the returned guard sends SIGCONT when dropped.
pub fn stop_process(pid: i32) -> Cont {
    signal(pid, libc::SIGSTOP);
    wait_until(&format!("process {pid} to stop"), WAIT, || stat(pid).is_some_and(|(st, _)| st == 'T'));
    Cont(pid)
}

/// A daemon that runs detached (`notifd -d`, or started by an init script), known by its
/// pid file. When dropped it stops the daemon (SIGTERM, then SIGKILL), and fails the test
/// if the pid file names a process that is gone: a daemon that stops removes its pid
/// file, so that one died.
pub struct PidGuard {
    /// The pid file the daemon writes.
    pub pid_file: PathBuf,
    /// The pid seen at start, used if the pid file is gone.
    pub pid: Option<i32>,
}

impl PidGuard {
    /// Guards the daemon that will write `pid_file`.
    pub fn new(pid_file: &Path) -> PidGuard {
        PidGuard { pid_file: pid_file.to_path_buf(), pid: None }
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        let from_file = read_pid(&self.pid_file);
        let Some(pid) = from_file.or(self.pid) else { return };
        if pid <= 1 || !comm(pid).is_some_and(|c| c.starts_with("notifd")) || !alive(pid) {
            if from_file.is_some() && !std::thread::panicking() {
                panic!("{} names pid {pid}, which is no longer running", self.pid_file.display());
            }
            return;
        }
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + WAIT;
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        kill_if_ours(pid, libc::SIGKILL);
    }
}

/// The address in the last `listening on ADDRESS` line of a log file, waiting (bounded)
/// for the line to appear: how a test finds the port of a daemon started with
/// `port = 0` that logs to a file.
pub fn listen_addr_in(log: &Path, timeout: Duration) -> SocketAddr {
    let mut addr = None;
    wait_until(&format!("a \"listening on\" line in {}", log.display()), timeout, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        addr = text
            .lines()
            .filter_map(|l| l.rsplit_once("listening on "))
            .map(|(_, a)| a.trim().to_string())
            .next_back();
        addr.is_some()
    });
    let addr = addr.unwrap();
    addr.parse().unwrap_or_else(|e| panic!("bad address {addr:?} in {}: {e}", log.display()))
}

/// A loopback port where nothing listens, held for as long as this lives: the socket is
/// bound but never listens, so a connection there is refused, and no other test can take
/// the port in the meantime (a port found free and released at once would race with the
/// tests running in parallel).
pub struct ClosedPort {
    _sock: socket2::Socket,
    /// The port.
    pub port: u16,
}

impl ClosedPort {
    /// Binds a new one on 127.0.0.1.
    pub fn new() -> ClosedPort {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind 127.0.0.1:0");
        let port = sock.local_addr().unwrap().as_socket().unwrap().port();
        ClosedPort { _sock: sock, port }
    }
}

/// `+OK PUB <id> <n>`: the id and n (the connections the MSG was queued to).
pub fn parse_ok_pub(line: &str) -> (u64, u64) {
    let rest = line.strip_prefix("+OK PUB ").unwrap_or_else(|| panic!("expected +OK PUB, got {line:?}"));
    let mut f = rest.split(' ');
    let id = f.next().unwrap().parse().unwrap_or_else(|_| panic!("bad id in {line:?}"));
    let n = f.next().unwrap_or_else(|| panic!("no n in {line:?}")).parse().unwrap();
    assert!(f.next().is_none(), "extra words in {line:?}");
    assert!(id > 0, "ids are positive: {line:?}");
    (id, n)
}

/// Publishes from a connection that receives no MSG for `event` (its next line is the
/// reply); returns the id and n of `+OK PUB <id> <n>`.
pub fn publish(c: &mut Client, event: &str, text: &str) -> (u64, u64) {
    c.cmd(&format!("PUB {event} {text}"));
    parse_ok_pub(&c.line())
}

/// Whether `s` is RFC 3339 in UTC to the second, as the protocol writes times
/// (`2026-11-28T00:05:09Z`).
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// The one value of an email header; fails if the header is missing or repeated.
pub fn header(mail: &mailparse::ParsedMail, name: &str) -> String {
    use mailparse::MailHeaderMap;
    let all = mail.headers.get_all_values(name);
    assert_eq!(all.len(), 1, "exactly one {name} header, got {all:?}");
    all[0].clone()
}

/// Says that `test` did not run here and why: a `SKIPPED: <test>: <why>` line on stderr,
/// and the same line appended to `skipped.txt` in cargo's test folder, which `make test`
/// prints at the end (cargo hides a passing test's output, so the skip would not show).
/// The caller returns right after.
pub fn skip(test: &str, why: &str) {
    let line = format!("SKIPPED: {test}: {why}\n");
    eprint!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped.txt");
    // One write of a short line with O_APPEND: tests skipping in parallel do not mix.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        eprintln!("cannot record the skip in {}: {e}", path.display());
    }
}

/// A line-protocol client with its own buffer, so a read timeout never loses bytes.
pub struct Client {
    pub sock: TcpStream,
    buf: Vec<u8>,
    /// The greeting line, without its CRLF.
    pub greeting: String,
}

impl Client {
    /// Connects and reads the greeting, which must be `HELLO notifd 1 ...`.
    pub fn connect(addr: SocketAddr) -> Client {
        let mut c = Client::connect_raw(addr);
        c.greeting = c.line();
        assert!(c.greeting.starts_with("HELLO notifd 1"), "unexpected greeting {:?}", c.greeting);
        c
    }

    /// Connects without reading anything.
    pub fn connect_raw(addr: SocketAddr) -> Client {
        let sock = TcpStream::connect_timeout(&addr, WAIT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Client::from_stream(sock)
    }

    /// Wraps a connected socket.
    pub fn from_stream(sock: TcpStream) -> Client {
        Client { sock, buf: Vec::new(), greeting: String::new() }
    }

    /// Sends `s` as is (include the line ends).
    pub fn send(&mut self, s: &str) {
        self.send_bytes(s.as_bytes());
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, b: &[u8]) {
        self.sock.write_all(b).expect("send to notifd");
    }

    /// Sends one command line, CRLF added.
    pub fn cmd(&mut self, line: &str) {
        self.send(&format!("{line}\r\n"));
    }

    /// The next line within `timeout`, CRLF removed; `Ok(None)` at EOF, `Err` at the timeout
    /// or when the connection was reset (a reset is not the orderly close the protocol
    /// promises: it is what a crashed daemon leaves).
    pub fn try_line(&mut self, timeout: Duration) -> Result<Option<String>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=i).collect();
                assert!(
                    raw.ends_with(b"\r\n"),
                    "server line not ended by CRLF: {:?}",
                    String::from_utf8_lossy(&raw)
                );
                let s = String::from_utf8(raw[..raw.len() - 2].to_vec()).expect("server sends UTF-8");
                return Ok(Some(s));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no line within {timeout:?}; partial {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
            self.sock.set_read_timeout(Some(deadline - now)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => {
                    assert!(
                        self.buf.is_empty(),
                        "EOF after a partial line {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                    return Ok(None);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(format!(
                        "connection reset by the server; partial {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Err(e) => panic!("read from notifd: {e}"),
            }
        }
    }

    /// The next line (waits up to 10 s).
    pub fn line(&mut self) -> String {
        match self.try_line(WAIT) {
            Ok(Some(l)) => l,
            Ok(None) => panic!("connection closed while a line was expected"),
            Err(e) => panic!("{e}"),
        }
    }

    /// The next line is exactly `want`.
    pub fn expect(&mut self, want: &str) {
        let got = self.line();
        assert_eq!(got, want, "expected {want:?}, got {got:?}");
    }

    /// The next line is `-ERR <code> <text>` with a non-empty text; returns the text.
    pub fn expect_err(&mut self, code: &str) -> String {
        let got = self.line();
        check_err(&got, code)
    }

    /// The server closes the connection next, with nothing more sent.
    pub fn expect_eof(&mut self) {
        match self.try_line(WAIT) {
            Ok(None) => {}
            Ok(Some(l)) => panic!("expected the connection to close, got {l:?}"),
            Err(e) => panic!("expected the connection to close: {e}"),
        }
    }

    /// Nothing more arrives (checked by a PING round trip): returns the lines before PONG.
    pub fn sync(&mut self) -> Vec<String> {
        let tag = "sync-marker";
        self.cmd(&format!("PING {tag}"));
        let mut before = Vec::new();
        loop {
            let l = self.line();
            if l == format!("PONG {tag}") {
                return before;
            }
            before.push(l);
        }
    }

    /// Closes the sending side: the server treats it like QUIT.
    pub fn shutdown_write(&mut self) {
        self.sock.shutdown(Shutdown::Write).expect("shutdown(Write)");
    }

    /// The local address of the client socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }
}

/// `line` is `-ERR <code> <non-empty text>`; returns the text.
pub fn check_err(line: &str, code: &str) -> String {
    let prefix = format!("-ERR {code} ");
    let text = line.strip_prefix(&prefix).unwrap_or_else(|| panic!("expected {prefix:?}..., got {line:?}"));
    assert!(!text.trim().is_empty(), "empty error text in {line:?}");
    text.to_string()
}

/// Bytes the daemon has not yet read from the client whose socket is bound to `client`
/// (the server side's receive queue, from /proc/net/tcp{,6}); `None` if not found.
pub fn server_unread(client: SocketAddr, server_port: u16) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 {
                continue;
            }
            let port = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if port(f[1]) == Some(server_port) && port(f[2]) == Some(client.port()) {
                let rx = f[4].split(':').nth(1)?;
                return u64::from_str_radix(rx, 16).ok();
            }
        }
    }
    None
}

/// Waits (up to [`WAIT`]) for a line containing `word` on `lines`, skipping others, and
/// returns it: what a child process said on its stderr. `who` names it in the panic.
pub fn said(lines: &std::sync::mpsc::Receiver<String>, word: &str, who: &str) -> String {
    let end = Instant::now() + WAIT;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|_| panic!("{who} never said {word:?}"));
        if line.contains(word) {
            return line;
        }
    }
}

/// `notif -H 127.0.0.1 -p PORT ARGS`, with the test's own `NOTIF_*` variables removed
/// and its output piped (input from /dev/null), ready to spawn.
pub fn notif_command(port: u16, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_notif"));
    c.env_remove("NOTIF_HOST")
        .env_remove("NOTIF_PORT")
        .env_remove("NOTIF_TOKEN")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}
