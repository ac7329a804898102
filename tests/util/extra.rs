//! More shared helpers: a daemon started with its own arguments and resource limits,
//! TCP state read back from /proc, niceness, and a network namespace for one test.
//!
//! Kept apart from `mod.rs` so that `Daemon` stays the one way most tests start notifd.

#![allow(dead_code)]

use super::{kill_if_ours, signal, WAIT};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Prints the visible skip line the test conventions ask for.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED: {test}: {why}");
}

/// Whether the tests run as root (namespaces, mounts).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sends SIGCONT to a pid when dropped, so a failing test leaves no process stopped.
pub struct Resume(pub i32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// The database read-write, for a test that owns it (the daemon stopped, or a lock held
/// on purpose).
pub fn db_rw(path: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).expect("open the database read-write");
    db.busy_timeout(WAIT).expect("busy_timeout");
    db
}

/// Fields of /proc/<pid>/stat from the state on (field 3 is index 0); `None` once gone.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces: the fields start after the last ')'.
    Some(s[s.rfind(')')? + 2..].split(' ').map(str::to_string).collect())
}

/// The niceness of a process (field 19 of /proc/<pid>/stat).
pub fn niceness(pid: i32) -> Option<i64> {
    stat_fields(pid)?.get(19 - 3)?.parse().ok()
}

/// The server side of the TCP connection from `client` to `server_port`, as the kernel
/// shows it in /proc/net/tcp{,6}: the timer that is armed (0 none, 1 retransmit,
/// 2 keepalive, 4 zero-window probe) and when it fires, in clock ticks from now.
pub fn server_timer(client: SocketAddr, server_port: u16) -> Option<(u8, u64)> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if f.len() > 5 && port(f[1]) == Some(server_port) && port(f[2]) == Some(client.port()) {
                let (tr, when) = f[5].split_once(':')?;
                return Some((u8::from_str_radix(tr, 16).ok()?, u64::from_str_radix(when, 16).ok()?));
            }
        }
    }
    None
}

/// Clock ticks per second, the unit of /proc/net/tcp's timers.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

/// Runs `body` on a thread of its own in a new network namespace (where only that
/// thread, and the processes it starts, live), with the loopback up and `v6` added to
/// it. Returns `Err(reason)` when this machine cannot make one (not root, no `ip`).
pub fn in_new_netns<T: Send + 'static>(
    v6: &'static [&'static str],
    body: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if !is_root() {
        return Err("needs root to make a network namespace".into());
    }
    let t = std::thread::spawn(move || -> Result<T, String> {
        // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        let ip = |args: &[&str]| -> Result<(), String> {
            let st = Command::new("ip").args(args).stdout(Stdio::null()).status();
            match st {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("ip {}: {s}", args.join(" "))),
                Err(e) => Err(format!("cannot run ip: {e}")),
            }
        };
        ip(&["link", "set", "lo", "up"])?;
        for a in v6 {
            ip(&["-6", "addr", "add", a, "dev", "lo", "nodad"])?;
        }
        Ok(body())
    });
    match t.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A notifd that the test starts itself, with extra arguments and an open-files limit,
/// logging to a file in its folder (`Daemon` cannot pass either). What it says before
/// its log is open goes to a second file, read as part of the log.
pub struct LoggedDaemon {
    /// Its folder: configuration, database, log.
    pub dir: tempfile::TempDir,
    /// The log file (the `log` key).
    pub log: PathBuf,
    stderr: PathBuf,
    /// Where it listens, as given in its log.
    pub listen: SocketAddr,
    child: Option<Child>,
}

impl LoggedDaemon {
    /// Starts `notifd -c <conf> <args>` with the test defaults plus `extra_config`, with
    /// RLIMIT_NOFILE set to `nofile` (soft and hard) when given; waits until it listens.
    pub fn start(extra_config: &str, args: &[&str], nofile: Option<u64>) -> LoggedDaemon {
        let dir = tempfile::Builder::new().prefix("notifd-test-").tempdir().expect("temporary folder");
        let log = dir.path().join("notifd.log");
        let stderr = dir.path().join("stderr");
        let conf = super::write_config(dir.path(), &format!("log = {:?}\n{extra_config}", log.display()));
        let mut cmd = Command::new(super::bin());
        cmd.arg("-c").arg(&conf).args(args).stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&stderr).expect("create the stderr file"));
        if let Some(n) = nofile {
            // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start notifd");
        let mut d =
            LoggedDaemon { dir, log, stderr, listen: "127.0.0.1:0".parse().unwrap(), child: Some(child) };
        let line = d.wait_log(|l| l.contains("listening on "), WAIT);
        let addr = line.rsplit("listening on ").next().unwrap().trim();
        d.listen = addr.parse().unwrap_or_else(|e| panic!("bad address {addr:?} in the log: {e}"));
        d
    }

    /// The log so far, line by line: standard error first, then the log file.
    pub fn log_lines(&self) -> Vec<String> {
        let mut text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(&self.log).unwrap_or_default());
        text.lines().map(str::to_string).collect()
    }

    /// Waits (bounded) until a log line satisfies `pred`; returns it. Panics at the timeout.
    pub fn wait_log(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("notifd exited ({st}) before the awaited log line");
            }
            assert!(Instant::now() < deadline, "no such log line within {timeout:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    /// Rewrites the configuration (defaults, the log file, then `extra_config`), sends
    /// SIGHUP and waits for the reload's log line.
    pub fn reload(&mut self, extra_config: &str) {
        let done = |l: &str| l.contains("configuration reloaded");
        let before = self.log_lines().iter().filter(|l| done(l)).count();
        super::write_config(self.dir.path(), &format!("log = {:?}\n{extra_config}", self.log.display()));
        signal(self.pid(), libc::SIGHUP);
        let deadline = Instant::now() + WAIT;
        while self.log_lines().iter().filter(|l| done(l)).count() <= before {
            assert!(Instant::now() < deadline, "no reload within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A new client, greeting read.
    pub fn client(&self) -> super::Client {
        super::Client::connect(SocketAddr::from(([127, 0, 0, 1], self.listen.port())))
    }
}

impl Drop for LoggedDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for l in self.log_lines() {
            if let Some(pid) = l
                .split(" started (pid ")
                .nth(1)
                .and_then(|r| r.trim_end().strip_suffix(')'))
                .and_then(|n| n.parse().ok())
            {
                kill_if_ours(pid, libc::SIGKILL);
            }
        }
        if std::thread::panicking() {
            eprintln!("==== notifd log ====\n{}\n==== end of log ====", self.log_lines().join("\n"));
        }
    }
}

/// The keepalive timer of the server's side of `client`'s connection: `Some(seconds
/// left, rounded up)` when armed, `None` when no timer is. Waits (bounded) until the
/// greeting is acknowledged, since a retransmit timer hides the keepalive one.
pub fn keepalive_timer(client: &super::Client, server_port: u16) -> Option<u64> {
    let mut timer = None;
    super::wait_until("the connection to go idle", WAIT, || {
        timer = server_timer(client.local_addr(), server_port);
        timer.is_some_and(|(tr, _)| tr == 0 || tr == 2)
    });
    let (tr, when) = timer.unwrap();
    (tr == 2).then(|| when.div_ceil(clock_ticks()))
}
