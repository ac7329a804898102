//! Where and how much notifd logs: `-d` without a `log` key logs to syslog (facility
//! daemon, ident notifd), and each `-v` logs one level more than `log_level`.

mod util;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use util::extra::{self, LoggedDaemon};
use util::{Client, WAIT};

/// syslog(3) priority of facility daemon at `level`.
fn daemon_prio(level: i32) -> String {
    format!("<{}>", libc::LOG_DAEMON | level)
}

/// A `notifd -d` whose /dev/log is the test's socket: it runs in a mount namespace of
/// its own with a private /dev. Stopped by its pid file when dropped.
struct Detached {
    dir: tempfile::TempDir,
    syslog: UnixDatagram,
    pid: i32,
    /// Every datagram received so far.
    seen: Vec<String>,
}

impl Detached {
    /// Starts it, or says why it cannot run here.
    fn start(args: &[&str]) -> Result<Detached, String> {
        if !extra::is_root() {
            return Err("needs root for a mount namespace with its own /dev/log".into());
        }
        let dir = tempfile::Builder::new().prefix("notifd-test-").tempdir().unwrap();
        let sock = dir.path().join("log.sock");
        let syslog = UnixDatagram::bind(&sock).unwrap();
        let pid_file = dir.path().join("notifd.pid");
        let conf = util::write_config(
            dir.path(),
            &format!("log_level = \"info\"\npid_file = {:?}", pid_file.display().to_string()),
        );
        // glibc's syslog(3) always writes to /dev/log: give the daemon a /dev where that
        // is the test's socket.
        let script = r#"sock=$1 bin=$2 conf=$3; shift 3
            mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3 && ln -s "$sock" /dev/log &&
            exec "$bin" -d -c "$conf" "$@""#;
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(&sock)
            .arg(util::bin())
            .arg(&conf)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run unshare: {e}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            if stderr.contains("unshare failed") || stderr.contains("mount") || stderr.contains("mknod") {
                return Err(format!("no private mount namespace here: {}", stderr.trim()));
            }
            panic!("notifd -d failed ({}): {stderr}", out.status);
        }
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        Ok(Detached { dir, syslog, pid, seen: Vec::new() })
    }

    /// Waits (bounded) for a datagram that contains `needle`; returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 8192];
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no syslog line with {needle:?}; got {:#?}", self.seen);
            self.syslog.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.syslog.recv(&mut buf) {
                self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// The port from the `listening on` line.
    fn port(&mut self) -> u16 {
        let l = self.wait_for("reactor: listening on ");
        l.rsplit(':').next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        util::signal(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while util::alive_notifd(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        util::kill_if_ours(self.pid, libc::SIGKILL);
        if std::thread::panicking() {
            eprintln!("==== syslog ({}) ====\n{}\n====", self.dir.path().display(), self.seen.join("\n"));
        }
    }
}

/// One client round trip, then a reload whose log line comes after anything the
/// client's connection logged.
fn connect_and_reload(d: &mut Detached) {
    let port = d.port();
    let mut c = Client::connect(([127, 0, 0, 1], port).into());
    c.cmd("PING");
    c.expect("PONG");
    util::signal(d.pid, libc::SIGHUP);
    d.wait_for("configuration reloaded");
}

#[test]
fn detached_logs_to_syslog_by_default() {
    let mut d = match Detached::start(&[]) {
        Ok(d) => d,
        Err(why) => return extra::skip("detached_logs_to_syslog_by_default", &why),
    };
    let l = d.wait_for("reactor: listening on ");
    assert!(l.starts_with(&daemon_prio(libc::LOG_INFO)), "facility daemon, level info: {l:?}");
    assert!(l.contains(&format!("notifd[{}]: reactor: listening on ", d.pid)), "ident notifd: {l:?}");
    connect_and_reload(&mut d);
    // log_level = "info": the connection's debug line is not sent.
    assert!(!d.seen.iter().any(|l| l.contains(": connected")), "{:#?}", d.seen);
    assert!(Path::new(&d.dir.path().join("notifd.pid")).exists());
}

#[test]
fn detached_v_sends_debug_lines_to_syslog() {
    let mut d = match Detached::start(&["-v"]) {
        Ok(d) => d,
        Err(why) => return extra::skip("detached_v_sends_debug_lines_to_syslog", &why),
    };
    let port = d.port();
    let mut c = Client::connect(([127, 0, 0, 1], port).into());
    c.cmd("PING");
    c.expect("PONG");
    let l = d.wait_for(": connected");
    assert!(l.starts_with(&daemon_prio(libc::LOG_DEBUG)), "{l:?}");
    assert!(l.contains("reactor: 127.0.0.1:"), "{l:?}");
    // The store logs there too, under its own pid and role: its last line, at a stop.
    util::signal(d.pid, libc::SIGTERM);
    let l = d.wait_for("store: reactor closed the pipe; exiting");
    assert!(l.starts_with(&daemon_prio(libc::LOG_DEBUG)) && l.contains("notifd["), "{l:?}");
    assert!(!l.contains(&format!("notifd[{}]", d.pid)), "the store logged under the parent's pid: {l:?}");
}

/// Whether the log has a line of `level` after a client's round trip (which the
/// reactor logs at debug).
fn logs_at(d: &LoggedDaemon, level: &str) -> bool {
    let mut c = d.client();
    c.cmd("PING");
    c.expect("PONG");
    d.log_lines().iter().any(|l| l.contains(&format!(": reactor: {level}: ")))
}

#[test]
fn each_v_logs_one_level_more() {
    let quiet = LoggedDaemon::start("log_level = \"info\"", &[], None);
    assert!(!logs_at(&quiet, "debug"), "debug lines at log_level info");
    let one = LoggedDaemon::start("log_level = \"info\"", &["-v"], None);
    assert!(logs_at(&one, "debug"), "no debug lines with -v over info");
    // From warn, -vv reaches debug too ("listening on" is info: the start waited for it).
    let two = LoggedDaemon::start("log_level = \"warn\"", &["-vv"], None);
    assert!(logs_at(&two, "debug"), "no debug lines with -vv over warn");
}

#[test]
fn v_still_counts_after_a_reload() {
    let mut d = LoggedDaemon::start("log_level = \"info\"", &["-v"], None);
    d.reload("log_level = \"info\"");
    assert!(
        !d.log_lines().iter().any(|l| l.contains("configuration reloaded: changed log_level")),
        "an unchanged file changed the level"
    );
    assert!(logs_at(&d, "debug"), "no debug lines with -v after a reload");
}
