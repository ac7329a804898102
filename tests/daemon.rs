//! notifd as a Unix daemon: `-d` and its pid file, SIGHUP reloads, dropping privileges.

mod util;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use util::{alive, read_pid, wait_until, Daemon, PidGuard, WAIT};

/// The configuration of a test's `-d` daemon: its log and pid file in the test's folder.
fn detached_config(dir: &Path, extra: &str) -> PathBuf {
    let log = dir.join("notifd.log");
    util::write_config(
        dir,
        &format!("pid_file = \"notifd.pid\"\nlog = {:?}\n{extra}", log.display().to_string()),
    )
}

/// Starts `notifd -d`, which must succeed; returns its pid and where it listens.
fn detach(dir: &Path, conf: &Path) -> (i32, SocketAddr) {
    let out = Command::new(util::bin()).arg("-d").arg("-c").arg(conf).output().unwrap();
    assert!(out.status.success(), "notifd -d failed: {}", String::from_utf8_lossy(&out.stderr));
    // -d returns only once the port is bound and the pid file written.
    let pid = read_pid(&dir.join("notifd.pid")).expect("pid file written before -d returned");
    (pid, util::listen_addr_in(&dir.join("notifd.log"), WAIT))
}

fn ping(addr: SocketAddr) -> String {
    let mut c = util::Client::connect(addr);
    c.cmd("PING");
    c.line()
}

/// Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [2] process
/// group, [3] session, [4] controlling terminal.
fn stat_fields(pid: i32) -> Vec<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')').next().unwrap().split_whitespace().skip(1).take(4).map(|f| f.parse().unwrap()).collect()
}

#[test]
fn detach_writes_the_pid_file_once_ready_and_removes_it_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let conf = detached_config(dir.path(), "");
    let pid_file = dir.path().join("notifd.pid");
    let _guard = PidGuard::new(&pid_file);
    let (pid, addr) = detach(dir.path(), &conf);
    assert!(alive(pid));
    assert_eq!(ping(addr), "PONG");
    // The daemon left the test's session for one of its own, in which it is not the
    // leader (the second fork), so it can never gain a controlling terminal; and it is no
    // child of the test (its parent is init or a subreaper).
    let [ppid, pgrp, sid, tty] = stat_fields(pid)[..] else { unreachable!() };
    let ours = nix::unistd::getsid(None).unwrap().as_raw() as i64;
    assert_ne!(sid, ours, "the daemon is still in the test's session");
    assert_eq!(pgrp, sid, "the daemon is in its session's first process group");
    assert_ne!(sid, pid as i64, "the daemon leads its session: it could gain a terminal");
    assert_eq!(tty, 0, "the daemon has a controlling terminal");
    assert_ne!(ppid, std::process::id() as i64, "the daemon is a child of the test");

    // A second start refuses while the first one runs.
    let out = Command::new(util::bin()).arg("-d").arg("-c").arg(&conf).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"), "{out:?}");

    util::signal(pid, libc::SIGTERM);
    wait_until("the daemon to exit", WAIT, || !alive(pid));
    assert!(!pid_file.exists(), "pid file left behind");
    let text = std::fs::read_to_string(dir.path().join("notifd.log")).unwrap();
    assert!(text.contains("stopped"), "{text}");
}

#[test]
fn a_stale_pid_file_does_not_block_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let conf = detached_config(dir.path(), "");
    let pid_file = dir.path().join("notifd.pid");
    // A pid that cannot be running: beyond pid_max.
    std::fs::write(&pid_file, "99999999\n").unwrap();
    let _guard = PidGuard::new(&pid_file);
    let (pid, addr) = detach(dir.path(), &conf);
    assert_ne!(pid, 99999999);
    assert_eq!(ping(addr), "PONG");
    util::signal(pid, libc::SIGTERM);
    wait_until("the daemon to exit", WAIT, || !alive(pid));
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
/// `util::Daemon` follows). When dropped it fails the test if the daemon is no longer
/// running (unless the test waited for its exit), then kills it.
struct FileLogged {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    addr: SocketAddr,
}

impl FileLogged {
    fn start(extra: &str, mode: u32) -> FileLogged {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let conf = util::write_config(dir.path(), &format!("log = \"notifd.log\"\n{extra}"));
        let child = Command::new(util::bin()).arg("-c").arg(&conf).spawn().unwrap();
        let mut d = FileLogged { dir, child: Some(child), addr: ([127, 0, 0, 1], 0).into() };
        d.addr = util::listen_addr_in(&d.log_path(), WAIT);
        d
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("notifd.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    /// SIGTERM, and whether it exited with status 0.
    fn stop(&mut self) -> bool {
        util::signal(self.pid(), libc::SIGTERM);
        self.child.take().unwrap().wait().unwrap().success()
    }
}

impl Drop for FileLogged {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let exited = child.try_wait().ok().flatten();
        let _ = child.kill();
        let _ = child.wait();
        if let Some(st) = exited {
            if !std::thread::panicking() {
                panic!("the daemon was no longer running at the end of the test ({st})\n{}", self.log());
            }
        }
    }
}

#[test]
fn sighup_reopens_the_log_file() {
    let d = FileLogged::start("", 0o700);
    std::fs::rename(d.log_path(), d.dir.path().join("notifd.log.1")).unwrap();
    util::signal(d.pid(), libc::SIGHUP);
    wait_until("a new log file", WAIT, || d.log().contains("configuration reloaded"));
    // The store reopened its log too: its last line, at exit, lands in the new file.
    let mut d = d;
    assert!(d.stop());
    let log = d.log();
    assert!(log.contains(": store: debug: reactor closed the pipe"), "{log}");
}

/// The credentials of a process, from /proc/PID/status: the real, effective, saved and
/// file-system uids, the same four gids, and the supplementary groups (sorted).
fn ids(pid: i32) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        let mut v: Vec<u32> = line.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect();
        v.sort_unstable();
        v
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

#[test]
fn as_root_all_three_processes_run_as_the_configured_user() {
    const TEST: &str = "as_root_all_three_processes_run_as_the_configured_user";
    if !nix::unistd::Uid::effective().is_root() {
        util::skip(TEST, "not running as root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        util::skip(TEST, "no user nobody");
        return;
    };
    // Every uid and gid is nobody's (a saved uid of 0 would let the process become root
    // again), and the groups are nobody's own, none of root's.
    let name = std::ffi::CString::new("nobody").unwrap();
    let mut groups: Vec<u32> =
        nix::unistd::getgrouplist(&name, nobody.gid).unwrap().iter().map(|g| g.as_raw()).collect();
    groups.sort_unstable();
    groups.dedup();
    let want = (vec![nobody.uid.as_raw(); 4], vec![nobody.gid.as_raw(); 4], groups);
    // The unprivileged user must be able to reach its folders inside the test's.
    let mut d = FileLogged::start("user = \"nobody\"\nmail_transport = \"spool\"", 0o755);
    assert!(d.log().contains("running as user nobody"), "{}", d.log());
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
    assert!(d.stop());
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
