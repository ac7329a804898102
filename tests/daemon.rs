//! notifd as a Unix daemon: `-d` and its pid file, SIGHUP reloads, dropping privileges.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use util::{Daemon, WAIT};

/// Kills a detached daemon by its pid file when a test ends, whatever happened.
struct PidGuard(PathBuf);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = read_pid(&self.0) {
            util::kill_if_ours(pid, libc::SIGKILL);
        }
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn ping(port: u16) -> String {
    let mut c = util::Client::connect(([127, 0, 0, 1], port).into());
    c.cmd("PING");
    c.line()
}

#[test]
fn detach_writes_the_pid_file_once_ready_and_removes_it_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("notifd.log");
    let conf = util::write_config(
        dir.path(),
        &format!("port = {port}\npid_file = \"run/notifd.pid\"\nlog = {:?}\n", log.display().to_string()),
    );
    let pid_file = dir.path().join("run/notifd.pid");
    let _guard = PidGuard(pid_file.clone());
    let out = Command::new(util::bin()).arg("-d").arg("-c").arg(&conf).output().unwrap();
    assert!(out.status.success(), "notifd -d failed: {}", String::from_utf8_lossy(&out.stderr));
    // -d returns only once the port is bound and the pid file written.
    let pid = read_pid(&pid_file).expect("pid file written before -d returned");
    assert!(alive(pid));
    assert_eq!(ping(port), "PONG");
    // The daemon left the foreground process's session.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let (ppid, sid) = (fields[1], fields[4]);
    assert_eq!(ppid, "1", "not reparented: {stat}");
    assert_ne!(sid, std::process::id().to_string());

    // A second start refuses while the first one runs.
    let out = Command::new(util::bin()).arg("-d").arg("-c").arg(&conf).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"), "{out:?}");

    util::signal(pid, libc::SIGTERM);
    wait_until("the daemon to exit", || !alive(pid));
    assert!(!pid_file.exists(), "pid file left behind");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("stopped"), "{text}");
}

#[test]
fn a_stale_pid_file_does_not_block_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = util::write_config(
        dir.path(),
        &format!("port = {port}\npid_file = \"notifd.pid\"\nlog = \"notifd.log\"\n"),
    );
    let pid_file = dir.path().join("notifd.pid");
    // A pid that cannot be running: beyond pid_max.
    std::fs::write(&pid_file, "99999999\n").unwrap();
    let _guard = PidGuard(pid_file.clone());
    let out = Command::new(util::bin()).arg("-d").arg("-c").arg(&conf).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid = read_pid(&pid_file).unwrap();
    assert_ne!(pid, 99999999);
    assert_eq!(ping(port), "PONG");
    util::signal(pid, libc::SIGTERM);
    wait_until("the daemon to exit", || !alive(pid));
}

#[test]
fn detach_reports_a_start_up_failure() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let conf = util::write_config(
        dir.path(),
        &format!("port = {port}\npid_file = \"notifd.pid\"\nlog = \"notifd.log\"\n"),
    );
    let out = Command::new(util::bin()).arg("-d").arg("-c").arg(&conf).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot bind") && err.lines().count() == 1, "{err}");
    assert!(!dir.path().join("notifd.pid").exists());
}

#[test]
fn sighup_changes_the_publish_token_and_refuses_a_broken_file() {
    let d = Daemon::start("publish_token = \"one\"");
    let mut c = d.client();
    c.cmd("PUB e x");
    c.expect_err("AUTH");
    c.cmd("AUTH one");
    c.expect("+OK AUTH");
    c.cmd("PUB e x");
    assert!(c.line().starts_with("+OK PUB "));

    let text = std::fs::read_to_string(&d.conf).unwrap().replace("\"one\"", "\"two\"");
    std::fs::write(&d.conf, &text).unwrap();
    util::signal(d.pid(), libc::SIGHUP);
    d.wait_log(|l| l.contains("configuration reloaded: changed publish_token"), WAIT);
    // The same connection is not disconnected, but must authenticate again.
    c.cmd("PUB e x");
    c.expect_err("AUTH");
    c.cmd("AUTH one");
    c.expect_err("AUTH");
    c.cmd("AUTH two");
    c.expect("+OK AUTH");
    c.cmd("PUB e x");
    assert!(c.line().starts_with("+OK PUB "));

    // A broken file is refused with its file and line, and the running one is kept.
    std::fs::write(&d.conf, format!("{text}# a comment\nprot = 1\n")).unwrap();
    let line_no = text.lines().count() + 2;
    util::signal(d.pid(), libc::SIGHUP);
    let refused = d.wait_log(|l| l.contains("reload refused"), WAIT);
    let want = format!("{} line {line_no}: unknown key \"prot\"", d.conf.display());
    assert!(refused.contains(&want), "{refused}\nwanted {want}");
    c.cmd("PUB e x");
    assert!(c.line().starts_with("+OK PUB "));
    let mut c2 = d.client();
    c2.cmd("AUTH two");
    c2.expect("+OK AUTH");
}

/// A foreground daemon that logs to `notifd.log` in its folder (not to stderr, which
/// `util::Daemon` follows), killed when dropped.
struct FileLogged {
    dir: tempfile::TempDir,
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl FileLogged {
    fn start(extra: &str, mode: u32) -> FileLogged {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let conf = util::write_config(dir.path(), &format!("log = \"notifd.log\"\n{extra}"));
        let child = Command::new(util::bin()).arg("-c").arg(&conf).spawn().unwrap();
        let mut d = FileLogged { dir, child, addr: ([127, 0, 0, 1], 0).into() };
        wait_until("the daemon to listen", || d.log().contains("listening on "));
        let log = d.log();
        let addr = log.rsplit("listening on ").next().unwrap().lines().next().unwrap();
        d.addr = addr.parse().unwrap();
        d
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("notifd.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for FileLogged {
    fn drop(&mut self) {
        util::kill_if_ours(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_reopens_the_log_file() {
    let d = FileLogged::start("", 0o700);
    std::fs::rename(d.log_path(), d.dir.path().join("notifd.log.1")).unwrap();
    util::signal(d.pid(), libc::SIGHUP);
    wait_until("a new log file", || d.log().contains("configuration reloaded"));
    // The store reopened its log too: its last line, at exit, lands in the new file.
    let mut d = d;
    util::signal(d.pid(), libc::SIGTERM);
    assert!(d.child.wait().unwrap().success());
    let log = d.log();
    assert!(log.contains(": store: debug: reactor closed the pipe"), "{log}");
}

/// Uid and gid of a process, from /proc.
fn ids(pid: i32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

#[test]
fn as_root_all_three_processes_run_as_the_configured_user() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: not running as root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user nobody");
        return;
    };
    // The unprivileged user must be able to reach its folders inside the test's.
    let mut d = FileLogged::start("user = \"nobody\"\nmail_transport = \"spool\"", 0o755);
    assert!(d.log().contains("running as user nobody"), "{}", d.log());
    let want = (nobody.uid.as_raw(), nobody.gid.as_raw());
    assert_eq!(ids(d.pid()), want, "reactor");
    let kids = util::children_of(d.pid());
    assert!(kids.len() >= 2, "children: {kids:?}");
    for k in kids {
        assert_eq!(ids(k), want, "child {k}");
    }
    // The store could create the database as that user, and it works.
    let mut c = util::Client::connect(d.addr);
    c.cmd("SUB e a@example.com");
    c.expect("+OK SUB e");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(d.dir.path().join("db/notifd.db")).unwrap();
    assert_eq!(meta.uid(), nobody.uid.as_raw());
    util::signal(d.pid(), libc::SIGTERM);
    assert!(d.child.wait().unwrap().success());
}

#[test]
fn a_database_that_cannot_be_opened_stops_the_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    // A folder where the database file should be: SQLite cannot open it.
    std::fs::create_dir_all(dir.path().join("db/notifd.db")).unwrap();
    let conf = util::write_config(dir.path(), "");
    let out = Command::new(util::bin()).arg("-c").arg(&conf).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store: error: cannot open"), "{err}");
    assert!(err.contains("notifd: the store exited at start-up"), "{err}");

    // With -d, the foreground process reports it and no daemon stays behind.
    let pid_file = dir.path().join("notifd.pid");
    let conf = util::write_config(dir.path(), "pid_file = \"notifd.pid\"\nlog = \"notifd.log\"");
    let out = Command::new(util::bin()).arg("-d").arg("-c").arg(&conf).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("the store exited at start-up"), "{out:?}");
    assert!(!pid_file.exists());
}
