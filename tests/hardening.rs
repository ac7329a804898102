//! Hardening (issue 9): files and modes, privileges, `-t` as the service user, secrets on
//! reload, one daemon per database, cleartext SMTP AUTH, hung sendmail, spool names.
//!
//! Tests about root run only as root (as in CI) and print `SKIPPED: <name>: <reason>`
//! elsewhere. Every daemon a test starts is stopped when the test ends.

mod util;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use util::{Client, Daemon, WAIT};

// --- helpers ---------------------------------------------------------------------------

/// The `nobody` account when this test runs as root; else prints why it skips.
fn root_and_nobody(test: &str) -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: {test}: needs root");
        return None;
    }
    match nix::unistd::User::from_name("nobody") {
        Ok(Some(u)) => Some(u),
        _ => {
            eprintln!("SKIPPED: {test}: no user nobody");
            None
        }
    }
}

/// A temporary folder that another user may enter (tempdir makes them 0700).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("notifd-harden-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn quoted(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Runs a command that must end by itself, bounded: (exit code, stdout, stderr). A
/// command still running after the bound (a daemon that should have refused to start)
/// is killed with its children and fails the test.
fn run_bounded(cmd: &mut Command) -> (Option<i32>, String, String) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let deadline = Instant::now() + WAIT * 2;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let pid = child.id() as i32;
            for k in util::children_of(pid) {
                util::kill_if_ours(k, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {:?}; stderr so far:\n{}", WAIT * 2, err.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The pipes close when the process (and anything it left) is gone.
    util::wait_until("the command's output to end", WAIT, || Arc::strong_count(&out) == 1);
    util::wait_until("the command's errors to end", WAIT, || Arc::strong_count(&err) == 1);
    let (o, e) = (out.lock().unwrap().clone(), err.lock().unwrap().clone());
    (status.code(), o, e)
}

/// Collects what `r` yields until EOF; the thread's handle on the text is dropped then.
fn reader(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let mine = Arc::clone(&text);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            mine.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

fn notifd_t(conf: &Path) -> (Option<i32>, String, String) {
    run_bounded(Command::new(util::bin()).arg("-t").arg("-c").arg(conf))
}

/// A foreground notifd on a configuration of the test's own (in a folder another user
/// can enter), its stderr collected; stopped with its children when dropped.
struct Fg {
    child: Option<Child>,
    err: Arc<Mutex<String>>,
}

impl Fg {
    fn start(conf: &Path) -> Fg {
        let mut child = Command::new(util::bin())
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = reader(child.stderr.take().unwrap());
        Fg { child: Some(child), err }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn log(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits for a line of its stderr (or of `file`) containing `needle`; returns it.
    fn wait_for(&self, file: Option<&Path>, needle: &str) -> String {
        let text = || match file {
            Some(f) => std::fs::read_to_string(f).unwrap_or_default(),
            None => self.log(),
        };
        let deadline = Instant::now() + WAIT * 2;
        loop {
            if let Some(l) = text().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}\n{}", self.log(), text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The port from the `listening on` line.
    fn port(&self, file: Option<&Path>) -> u16 {
        let line = self.wait_for(file, "listening on ");
        line.rsplit(':').next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for Fg {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id() as i32;
        let kids = util::children_of(pid);
        util::signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + WAIT;
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        for k in kids {
            util::kill_if_ours(k, libc::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("==== notifd stderr ====\n{}\n==== end ====", self.log());
        }
    }
}

/// Kills a detached daemon by its pid file when a test ends.
struct PidGuard(PathBuf);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0).ok().and_then(|t| t.trim().parse().ok()) {
            util::kill_if_ours(pid, libc::SIGKILL);
        }
    }
}

fn auth(port: u16, token: &str) -> String {
    let mut c = Client::connect(([127, 0, 0, 1], port).into());
    c.cmd(&format!("AUTH {token}"));
    c.line()
}

// --- 1. the log file -------------------------------------------------------------------

#[test]
fn a_log_that_is_a_link_to_a_root_file_is_refused_and_the_file_untouched() {
    let Some(nobody) =
        root_and_nobody("a_log_that_is_a_link_to_a_root_file_is_refused_and_the_file_untouched")
    else {
        return;
    };
    let dir = open_tempdir();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root's own\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The log folder belongs to the service account, which planted a link there.
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    nix::unistd::chown(&logs, Some(nobody.uid), Some(nobody.gid)).unwrap();
    std::os::unix::fs::symlink(&secret, logs.join("notifd.log")).unwrap();
    let conf = util::write_config(dir.path(), "user = \"nobody\"\nlog = \"logs/notifd.log\"");

    let (code, _, err) = run_bounded(Command::new(util::bin()).arg("-c").arg(&conf));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("notifd.log") && err.contains("symbolic link"), "{err}");
    let meta = std::fs::metadata(&secret).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, 0, 0o600));
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root's own\n");

    // A regular log file that is not the service account's is refused, not given to it.
    std::fs::remove_file(logs.join("notifd.log")).unwrap();
    std::fs::write(logs.join("notifd.log"), "earlier\n").unwrap();
    let (code, _, err) = run_bounded(Command::new(util::bin()).arg("-c").arg(&conf));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("belongs to uid 0"), "{err}");
    assert_eq!(std::fs::metadata(logs.join("notifd.log")).unwrap().uid(), 0);
    assert_eq!(std::fs::read_to_string(logs.join("notifd.log")).unwrap(), "earlier\n");

    // A log notifd creates itself is the service account's, 0640.
    std::fs::remove_file(logs.join("notifd.log")).unwrap();
    let log = logs.join("notifd.log");
    let d = Fg::start(&conf);
    d.port(Some(&log));
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (nobody.uid.as_raw(), 0o640));
}

// --- 2. modes ----------------------------------------------------------------------------

#[test]
fn files_are_0640_and_folders_0750_whatever_the_umask() {
    // The umask of whoever starts notifd must not matter.
    // SAFETY: umask has no preconditions; 022 is the usual default anyway.
    unsafe { libc::umask(0o022) };
    let dir = open_tempdir();
    let log = dir.path().join("notifd.log");
    let conf = util::write_config(
        dir.path(),
        "database = \"data/db/notifd.db\"\nmail_transport = \"spool\"\nlog = \"notifd.log\"",
    );
    let d = Fg::start(&conf);
    let port = d.port(Some(&log));
    let mut c = Client::connect(([127, 0, 0, 1], port).into());
    c.cmd("SUB modes a@example.org");
    c.expect("+OK SUB modes");
    let mut publisher = Client::connect(([127, 0, 0, 1], port).into());
    publisher.cmd("PUB modes hello");
    assert!(publisher.line().starts_with("+OK PUB "));
    let spool = dir.path().join("spool");
    util::wait_until("a spool file", WAIT * 2, || {
        std::fs::read_dir(&spool)
            .is_ok_and(|mut r| r.any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".eml")))
    });
    let eml = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "eml"))
        .unwrap();
    let db = dir.path().join("data/db");
    let mut got = Vec::new();
    for (p, want) in [
        (dir.path().join("data"), 0o755),
        (db.clone(), 0o750),
        (db.join("notifd.db"), 0o640),
        (db.join("notifd.db-wal"), 0o640),
        (db.join("notifd.db-shm"), 0o640),
        (db.join("notifd.db.lock"), 0o640),
        (log.clone(), 0o640),
        (spool.clone(), 0o750),
        (eml, 0o640),
    ] {
        let have =
            std::fs::symlink_metadata(&p).map_or("missing".into(), |m| format!("{:o}", m.mode() & 0o7777));
        got.push((p.display().to_string(), have, format!("{want:o}")));
    }
    let wrong: Vec<_> = got.iter().filter(|(_, m, w)| m != w).collect();
    assert!(wrong.is_empty(), "(path, mode, wanted): {wrong:?}");
}

// --- 3. missing parents ------------------------------------------------------------------

#[test]
fn missing_parents_are_made_so_the_service_user_can_reach_its_folder() {
    let Some(nobody) = root_and_nobody("missing_parents_are_made_so_the_service_user_can_reach_its_folder")
    else {
        return;
    };
    let dir = open_tempdir();
    let conf = util::write_config(dir.path(), "user = \"nobody\"\ndatabase = \"a/b/notifd.db\"");
    let d = Fg::start(&conf);
    let port = d.port(None);
    let mut c = Client::connect(([127, 0, 0, 1], port).into());
    c.cmd("SUB parents a@example.org");
    c.expect("+OK SUB parents");
    let a = std::fs::metadata(dir.path().join("a")).unwrap();
    assert_eq!((a.uid(), a.mode() & 0o7777), (0, 0o755), "a");
    let b = std::fs::metadata(dir.path().join("a/b")).unwrap();
    assert_eq!(
        (b.uid(), b.gid(), b.mode() & 0o7777),
        (nobody.uid.as_raw(), nobody.gid.as_raw(), 0o750),
        "a/b"
    );
    assert_eq!(std::fs::metadata(dir.path().join("a/b/notifd.db")).unwrap().uid(), nobody.uid.as_raw());
}

// --- 4. -t -------------------------------------------------------------------------------

#[test]
fn check_refuses_databases_it_cannot_use_and_creates_nothing() {
    let dir = open_tempdir();
    let check = |db: &str| {
        let conf = util::write_config(dir.path(), &format!("database = {db:?}"));
        notifd_t(&conf)
    };
    std::fs::write(dir.path().join("blocker"), "a file").unwrap();
    let (code, out, err) = check("blocker/notifd.db");
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("blocker is a file, not a folder"), "{err}");

    std::fs::write(dir.path().join("text.db"), "not a database at all\n").unwrap();
    let (code, _, err) = check("text.db");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not an SQLite database"), "{err}");

    let other = rusqlite::Connection::open(dir.path().join("other.db")).unwrap();
    other.execute_batch("CREATE TABLE accounts(id INTEGER); INSERT INTO accounts VALUES (1);").unwrap();
    drop(other);
    let (code, _, err) = check("other.db");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no \"subscriptions\" table"), "{err}");

    // Nothing was created on the way, and missing folders that can be made are fine.
    let (code, out, err) = check("new/db/notifd.db");
    assert_eq!((code, out.trim()), (Some(0), "configuration OK"), "{err}");
    assert!(!dir.path().join("new").exists());
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 4, "{names:?}"); // blocker, text.db, other.db, notifd.conf

    // notifd's own database passes, while the daemon runs and after it stopped.
    let mut d = Daemon::start("");
    let (code, _, err) = notifd_t(&d.conf);
    assert_eq!(code, Some(0), "{err}");
    d.stop();
    let (code, _, err) = notifd_t(&d.conf);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn check_as_root_looks_with_the_eyes_of_user() {
    let Some(nobody) = root_and_nobody("check_as_root_looks_with_the_eyes_of_user") else { return };
    let dir = open_tempdir();
    let root_only = dir.path().join("root-only");
    std::fs::create_dir(&root_only).unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef-token\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let user = "user = \"nobody\"\n";

    // A folder user cannot enter.
    let conf = util::write_config(dir.path(), &format!("{user}database = \"root-only/x/notifd.db\""));
    let (code, _, err) = notifd_t(&conf);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot enter") && err.contains("root-only"), "{err}");

    // A folder that exists but where user cannot create the database.
    let conf = util::write_config(dir.path(), &format!("{user}database = \"root-only/notifd.db\""));
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, err) = notifd_t(&conf);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot create files in"), "{err}");

    // Secrets that a reload, after the drop, could not read.
    for key in ["publish_token_file", "smtp_password_file"] {
        let extra = if key == "smtp_password_file" { "smtp_user = \"u\"\n" } else { "" };
        let conf = util::write_config(dir.path(), &format!("{user}{extra}{key} = {}", quoted(&secret)));
        let (code, _, err) = notifd_t(&conf);
        assert_eq!(code, Some(2), "{key}: {err}");
        assert!(err.contains(key) && err.contains("cannot read it"), "{key}: {err}");
        // Readable by user's group: fine.
        nix::unistd::chown(&secret, None, Some(nobody.gid)).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (code, _, err) = notifd_t(&conf);
        assert_eq!(code, Some(0), "{key}: {err}");
        nix::unistd::chown(&secret, None, Some(nix::unistd::Gid::from_raw(0))).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    // The configuration itself, reread on every reload.
    let conf = util::write_config(dir.path(), user);
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = notifd_t(&conf);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read the configuration"), "{err}");
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = notifd_t(&conf);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn check_warns_about_short_tokens_and_a_localhost_sender() {
    let dir = open_tempdir();
    let conf = util::write_config(
        dir.path(),
        "publish_token = \"short\"\nmail_transport = \"smtp\"\nsmtp_host = \"mx.example.org\"",
    );
    let (code, out, err) = notifd_t(&conf);
    assert_eq!((code, out.trim()), (Some(0), "configuration OK"), "{err}");
    assert!(err.contains("warning: publish_token is 5 characters"), "{err}");
    assert!(err.contains("warning: mail_from \"notifd@localhost\" is at localhost"), "{err}");
    let conf = util::write_config(dir.path(), "publish_token = \"0123456789abcdef\"");
    let (code, _, err) = notifd_t(&conf);
    assert_eq!((code, err.as_str()), (Some(0), ""));
}

// --- 5. publish_token_file -------------------------------------------------------------

#[test]
fn publish_token_file_is_read_at_start_and_on_hup() {
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    std::fs::write(&token, "first-token-0123456789\nignored\n").unwrap();
    let d = Daemon::start(&format!("publish_token_file = {}", quoted(&token)));
    assert_eq!(auth(d.port, "first-token-0123456789"), "+OK AUTH");

    std::fs::write(&token, "second-token-0123456789\n").unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log(|l| l.contains("configuration reloaded: changed publish_token"), WAIT);
    assert!(auth(d.port, "first-token-0123456789").starts_with("-ERR AUTH"));
    assert_eq!(auth(d.port, "second-token-0123456789"), "+OK AUTH");

    // An empty first line: refused, logged, and the running token stays.
    std::fs::write(&token, "\nthird-token-0123456789\n").unwrap();
    d.signal(libc::SIGHUP);
    let refused = d.wait_log(|l| l.contains("reload refused"), WAIT);
    assert!(refused.contains("publish_token_file") && refused.contains("first line is empty"), "{refused}");
    assert_eq!(auth(d.port, "second-token-0123456789"), "+OK AUTH");

    // Both keys: an error with the line.
    let dir = open_tempdir();
    let conf = util::write_config(
        dir.path(),
        &format!("publish_token = \"0123456789abcdefgh\"\npublish_token_file = {}", quoted(&token)),
    );
    let (code, _, err) = notifd_t(&conf);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("line ") && err.contains("\"publish_token_file\" and \"publish_token\" are both set"),
        "{err}"
    );
}

#[test]
fn a_token_user_cannot_read_is_refused_by_hup_and_by_the_init_scripts_reload() {
    let Some(nobody) =
        root_and_nobody("a_token_user_cannot_read_is_refused_by_hup_and_by_the_init_scripts_reload")
    else {
        return;
    };
    if !Command::new("sh")
        .args(["-c", "command -v start-stop-daemon"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: a_token_user_cannot_read_is_refused_by_hup_and_by_the_init_scripts_reload: no start-stop-daemon");
        return;
    }
    let dir = open_tempdir();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let conf = util::write_config(dir.path(), "user = \"nobody\"\npublish_token_file = \"token\"");
    let d = Fg::start(&conf);
    let port = d.port(None);
    assert_eq!(auth(port, "first-token-0123456789"), "+OK AUTH");

    // The init script's reload: -t as user says no, and no HUP is sent.
    let pid_file = dir.path().join("notifd.pid");
    std::fs::write(&pid_file, format!("{}\n", d.pid())).unwrap();
    let defaults = dir.path().join("defaults");
    std::fs::write(
        &defaults,
        format!("DAEMON={}\nCONFIG={}\nPIDFILE={}\n", util::bin(), conf.display(), pid_file.display()),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("init/notifd.init");
    std::fs::write(&token, "second-token-0123456789\n").unwrap();
    let reload =
        || run_bounded(Command::new("sh").arg(&script).arg("reload").env("NOTIFD_DEFAULTS", &defaults));
    let (code, out, err) = reload();
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains("publish_token_file"), "{out}{err}");

    // A HUP sent anyway is refused by the daemon, which keeps the running token.
    util::signal(d.pid(), libc::SIGHUP);
    d.wait_for(None, "reload refused");
    assert_eq!(auth(port, "first-token-0123456789"), "+OK AUTH");

    // Made readable by user's group, the reload goes through.
    nix::unistd::chown(&token, None, Some(nobody.gid)).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, out, err) = reload();
    assert_eq!(code, Some(0), "{out}{err}");
    d.wait_for(None, "configuration reloaded: changed publish_token");
    assert_eq!(auth(port, "second-token-0123456789"), "+OK AUTH");
}

// --- 6. start-up failures and one daemon per database ----------------------------------

#[test]
fn detach_prints_why_the_store_failed_even_without_a_log() {
    let dir = open_tempdir();
    // A folder where the database file should be; the log is syslog, which may not exist.
    std::fs::create_dir_all(dir.path().join("db/notifd.db")).unwrap();
    let pid_file = dir.path().join("notifd.pid");
    let _guard = PidGuard(pid_file.clone());
    let conf = util::write_config(dir.path(), "pid_file = \"notifd.pid\"");
    let (code, _, err) = run_bounded(Command::new(util::bin()).arg("-d").arg("-c").arg(&conf));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unable to open database file") && err.contains("db/notifd.db"), "{err}");
    assert!(!pid_file.exists());
}

#[test]
fn a_second_daemon_on_the_same_database_refuses_to_start() {
    let d = Daemon::start("");
    let dir = open_tempdir();
    let conf = util::write_config(dir.path(), &format!("database = {}", quoted(&d.path("db/notifd.db"))));
    let (code, _, err) = run_bounded(Command::new(util::bin()).arg("-c").arg(&conf));
    assert_eq!(code, Some(1), "{err}");
    let holder = format!("pid {} holds", d.store_pid());
    assert!(err.contains("in use by another notifd") && err.contains(&holder), "{err}");
    // The first one is unharmed.
    let mut c = d.client();
    c.cmd("SUB lock a@example.org");
    c.expect("+OK SUB lock");
}

#[test]
fn make_run_listens_on_loopback_only() {
    if !Command::new("make").arg("--version").output().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: make_run_listens_on_loopback_only: no make");
        return;
    }
    let dir = open_tempdir();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in ["Makefile", "notifd.conf.example"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let (code, out, err) = run_bounded(Command::new("make").arg("-C").arg(dir.path()).arg("run/notifd.conf"));
    assert_eq!(code, Some(0), "{out}{err}");
    let conf = dir.path().join("run/notifd.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let hosts: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with("host ")).collect();
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    let host = hosts[0].split('"').nth(1).unwrap();
    assert!(["127.0.0.1", "::1", "localhost"].contains(&host), "make run listens on {host:?}");
    let (code, _, err) = notifd_t(&conf);
    assert_eq!(code, Some(0), "{err}");
}

// --- 7. cleartext SMTP AUTH -------------------------------------------------------------

#[test]
fn smtp_auth_without_tls_to_another_host_is_a_configuration_error() {
    let dir = open_tempdir();
    let conf = util::write_config(
        dir.path(),
        "mail_transport = \"smtp\"\nsmtp_host = \"192.0.2.25\"\nsmtp_user = \"notifd\"",
    );
    let (code, _, err) = notifd_t(&conf);
    assert_eq!(code, Some(2), "{err}");
    let want = format!("notifd: {} line ", conf.display());
    assert!(err.starts_with(&want) && err.contains("\"smtp_user\"") && err.contains("in the clear"), "{err}");
    let (code, _, err) = run_bounded(Command::new(util::bin()).arg("-c").arg(&conf));
    assert_eq!(code, Some(2), "{err}");
    // To a relay on this host, or with TLS, it is allowed.
    for extra in ["smtp_host = \"127.0.0.1\"", "smtp_host = \"192.0.2.25\"\nsmtp_tls = \"starttls\""] {
        let conf = util::write_config(
            dir.path(),
            &format!("mail_transport = \"smtp\"\nsmtp_user = \"notifd\"\n{extra}"),
        );
        let (code, _, err) = notifd_t(&conf);
        assert_eq!(code, Some(0), "{extra}: {err}");
    }
}

// --- 15. sendmail_timeout ----------------------------------------------------------------

#[test]
fn a_hung_sendmail_is_killed_and_the_email_retried() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = dir.path().join("sendmail");
    // Hangs with a child of its own, which must die with it.
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncat >/dev/null\nsleep 60 &\necho $$ $! >> {}\nwait\n", quoted(&pids)),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(&format!(
        "mail_transport = \"sendmail\"\nsendmail_path = {}\nsendmail_timeout = 1\nmail_retry_base = 1",
        quoted(&script)
    ));
    let mut c = d.client();
    c.cmd("SUB hung a@example.org");
    c.expect("+OK SUB hung");
    let mut publisher = d.client();
    publisher.cmd("PUB hung hello");
    let id: i64 =
        publisher.line().strip_prefix("+OK PUB ").unwrap().split(' ').next().unwrap().parse().unwrap();
    let row = || -> Option<(String, i64, Option<String>)> {
        d.db()
            .query_row("SELECT state, tries, last_error FROM outbox WHERE notification_id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .ok()
    };
    util::wait_until("a try that timed out", WAIT * 2, || {
        row().is_some_and(|(_, tries, e)| tries >= 1 && e.is_some_and(|e| e.contains("killed")))
    });
    let (state, _, error) = row().unwrap();
    assert_ne!(state, "failed", "{error:?}");
    // The script and its child are gone.
    let text = std::fs::read_to_string(&pids).unwrap();
    let first: Vec<i32> = text.lines().next().unwrap().split(' ').map(|p| p.parse().unwrap()).collect();
    for pid in first {
        util::wait_until(
            "the killed sendmail's processes to go",
            WAIT,
            || !matches!(util::stat(pid), Some((state, _)) if state != 'Z'),
        );
    }
    // A sendmail that works takes the retry.
    let out = dir.path().join("sent.eml");
    let tmp = dir.path().join("sendmail.new");
    std::fs::write(&tmp, format!("#!/bin/sh\ncat > {}\n", quoted(&out))).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &script).unwrap();
    util::wait_until("the email sent on a later try", WAIT * 3, || {
        row().is_some_and(|(s, _, _)| s == "sent")
    });
    assert!(std::fs::read_to_string(&out).unwrap().contains("hello"));
}

// --- 16. spool file names ----------------------------------------------------------------

#[test]
fn spool_names_escape_shell_metacharacters() {
    let d = Daemon::start("mail_transport = \"spool\"");
    let address = "a`b$c|d&e*f?g'h{i}~j=k!l#m^n/o%p@example.org";
    let mut c = d.client();
    c.cmd(&format!("SUB spooled {address}"));
    c.expect("+OK SUB spooled");
    let mut publisher = d.client();
    publisher.cmd("PUB spooled hello");
    let id: u64 =
        publisher.line().strip_prefix("+OK PUB ").unwrap().split(' ').next().unwrap().parse().unwrap();
    let spool = d.path("spool");
    let name =
        format!("{id}-a%60b%24c%7Cd%26e%2Af%3Fg%27h%7Bi%7D%7Ej%3Dk%21l%23m%5En%2Fo%25p@example.org.eml");
    util::wait_until("the spool file", WAIT * 2, || spool.join(&name).exists());
    let names: Vec<String> =
        std::fs::read_dir(&spool).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, [name], "no other file, no temporary left");
}
