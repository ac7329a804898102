//! `make install`, `make uninstall`, `make install-init` and the SysV init
//! script, run for real into temporary DESTDIRs.
//!
//! The install tests need `make` and `install(1)`; the init script test also
//! needs `start-stop-daemon(8)` (Debian's dpkg package), and says that it
//! skipped without it. They install the binaries cargo built for the tests
//! (`NOTIFD_BIN`, `NOTIF_BIN`), so `make install` never runs cargo here.

mod util;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use util::{alive, read_pid, PidGuard, WAIT};

/// What `make install PREFIX=/usr/local SYSCONFDIR=/etc` installs, relative to
/// DESTDIR, with modes (OPERATIONS.md, "Files under make install").
const INSTALLED: &[(&str, u32)] = &[
    ("usr/local/sbin/notifd", 0o755),
    ("usr/local/bin/notif", 0o755),
    ("usr/local/share/man/man8/notifd.8", 0o644),
    ("usr/local/share/man/man5/notifd.conf.5", 0o644),
    ("usr/local/share/man/man7/notifd-protocol.7", 0o644),
    ("usr/local/share/man/man1/notif.1", 0o644),
    ("usr/local/share/notifd/notifd.conf.example", 0o644),
    ("usr/local/share/notifd/init/notifd.init", 0o755),
    ("usr/local/share/notifd/init/notifd.openrc", 0o755),
    ("usr/local/share/notifd/init/notifd.service", 0o644),
    ("etc/notifd.conf", 0o644),
];

fn source_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn notifd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_notifd"))
}

/// The client is built next to the daemon; `CARGO_BIN_EXE_notif` is not used
/// so that this file compiles before src/bin/notif.rs exists.
fn notif_bin() -> PathBuf {
    let notif = notifd_bin().with_file_name("notif");
    assert!(
        notif.is_file(),
        "{} is missing: make install needs the client, built from src/bin/notif.rs",
        notif.display()
    );
    notif
}

/// Runs `make -C <source> <args>` with the given DESTDIR, without the
/// variables of an enclosing make (`make test`), which would leak in
/// through MAKEFLAGS.
fn make(destdir: &Path, args: &[&str]) -> Output {
    Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(source_dir())
        .args(args)
        .arg(format!("DESTDIR={}", destdir.display()))
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .env_remove("MAKEOVERRIDES")
        .output()
        .expect("cannot run make")
}

fn make_ok(destdir: &Path, args: &[&str]) -> Output {
    let out = make(destdir, args);
    assert!(
        out.status.success(),
        "make {args:?} failed ({}):\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn make_install(destdir: &Path) {
    make_ok(
        destdir,
        &[
            "install",
            "PREFIX=/usr/local",
            "SYSCONFDIR=/etc",
            &format!("NOTIFD_BIN={}", notifd_bin().display()),
            &format!("NOTIF_BIN={}", notif_bin().display()),
        ],
    );
}

fn make_uninstall(destdir: &Path) {
    make_ok(destdir, &["uninstall", "PREFIX=/usr/local", "SYSCONFDIR=/etc"]);
}

/// Every file (not directory) under `root`, relative to it, with its mode.
fn files_under(root: &Path) -> BTreeMap<String, u32> {
    fn walk(root: &Path, dir: &Path, found: &mut BTreeMap<String, u32>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(root, &path, found);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_str().unwrap();
                found.insert(rel.to_owned(), meta.permissions().mode() & 0o7777);
            }
        }
    }
    let mut found = BTreeMap::new();
    walk(root, root, &mut found);
    found
}

fn assert_same_content(installed: &Path, source: &Path) {
    assert!(
        fs::read(installed).unwrap() == fs::read(source).unwrap(),
        "{} differs from {}",
        installed.display(),
        source.display()
    );
}

/// Every file in place with its mode, nothing else installed, and each file
/// a copy of its source.
fn assert_installed(destdir: &Path) {
    let found = files_under(destdir);
    for &(path, mode) in INSTALLED {
        let got =
            found.get(path).unwrap_or_else(|| panic!("{path} was not installed; installed: {found:#?}"));
        assert_eq!(*got, mode, "{path} has mode {got:o}, not {mode:o}");
    }
    let expected: Vec<&str> = INSTALLED.iter().map(|(p, _)| *p).collect();
    let extra: Vec<&String> = found.keys().filter(|p| !expected.contains(&p.as_str())).collect();
    assert!(extra.is_empty(), "make install put more files: {extra:?}");

    let src = source_dir();
    let prefix = destdir.join("usr/local");
    assert_same_content(&prefix.join("sbin/notifd"), &notifd_bin());
    assert_same_content(&prefix.join("bin/notif"), &notif_bin());
    assert_same_content(&prefix.join("share/man/man8/notifd.8"), &src.join("man/notifd.8"));
    assert_same_content(&prefix.join("share/man/man5/notifd.conf.5"), &src.join("man/notifd.conf.5"));
    assert_same_content(&prefix.join("share/man/man7/notifd-protocol.7"), &src.join("man/notifd-protocol.7"));
    assert_same_content(&prefix.join("share/man/man1/notif.1"), &src.join("man/notif.1"));
    assert_same_content(&prefix.join("share/notifd/notifd.conf.example"), &src.join("notifd.conf.example"));
    // With the default PREFIX and SYSCONFDIR, the init scripts' paths stay.
    for script in ["notifd.init", "notifd.openrc", "notifd.service"] {
        assert_same_content(&prefix.join("share/notifd/init").join(script), &src.join("init").join(script));
    }
}

#[test]
fn install_puts_every_file_in_place_and_uninstall_removes_them() {
    let dest = tempfile::tempdir().unwrap();
    make_install(dest.path());
    assert_installed(dest.path());
    let conf = dest.path().join("etc/notifd.conf");
    assert_same_content(&conf, &source_dir().join("notifd.conf.example"));

    // An edited configuration survives a second install and the uninstall.
    let mut edited = fs::read_to_string(&conf).unwrap();
    edited.push_str("port = 7601\n");
    fs::write(&conf, &edited).unwrap();
    make_install(dest.path());
    assert_installed(dest.path());
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited, "install overwrote an edited notifd.conf");

    make_uninstall(dest.path());
    let left = files_under(dest.path());
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        ["etc/notifd.conf"],
        "uninstall left files, or removed the edited configuration"
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
    assert!(!dest.path().join("usr/local/share/notifd").exists(), "uninstall left usr/local/share/notifd");
}

#[test]
fn uninstall_removes_an_unedited_configuration() {
    let dest = tempfile::tempdir().unwrap();
    make_install(dest.path());
    make_uninstall(dest.path());
    let left = files_under(dest.path());
    assert!(left.is_empty(), "uninstall left files: {left:?}");
}

#[test]
fn install_keeps_an_existing_configuration() {
    let dest = tempfile::tempdir().unwrap();
    fs::create_dir_all(dest.path().join("etc")).unwrap();
    let conf = dest.path().join("etc/notifd.conf");
    fs::write(&conf, "port = 7602\n").unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o640)).unwrap();
    make_install(dest.path());
    assert_eq!(fs::read_to_string(&conf).unwrap(), "port = 7602\n");
    let mode = fs::metadata(&conf).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "install changed the mode of an existing notifd.conf");
}

#[test]
fn install_init_puts_each_script_in_place() {
    let cases = [
        ("sysv", "etc/init.d/notifd", 0o755, "notifd.init"),
        ("openrc", "etc/init.d/notifd", 0o755, "notifd.openrc"),
        ("systemd", "etc/systemd/system/notifd.service", 0o644, "notifd.service"),
    ];
    for (init, path, mode, source) in cases {
        let dest = tempfile::tempdir().unwrap();
        make_ok(
            dest.path(),
            &["install-init", &format!("INIT={init}"), "PREFIX=/usr/local", "SYSCONFDIR=/etc"],
        );
        let found = files_under(dest.path());
        assert_eq!(found, BTreeMap::from([(path.to_owned(), mode)]), "make install-init INIT={init}");
        assert_same_content(&dest.path().join(path), &source_dir().join("init").join(source));

        // Another prefix is written into the installed script.
        let dest = tempfile::tempdir().unwrap();
        make_ok(
            dest.path(),
            &["install-init", &format!("INIT={init}"), "PREFIX=/opt/notifd", "SYSCONFDIR=/opt/etc"],
        );
        let text = fs::read_to_string(dest.path().join(path)).unwrap();
        assert!(
            text.contains("/opt/notifd/sbin/notifd") && text.contains("/opt/etc/notifd.conf"),
            "INIT={init}: PREFIX and SYSCONFDIR not substituted:\n{text}"
        );
        assert!(
            !text.contains("/usr/local/sbin")
                && text.matches("/etc/notifd.conf").count() == text.matches("/opt/etc/notifd.conf").count(),
            "INIT={init}: default paths left in:\n{text}"
        );

        make_ok(dest.path(), &["uninstall-init", &format!("INIT={init}")]);
        assert!(files_under(dest.path()).is_empty(), "uninstall-init INIT={init} left files");
    }
    let dest = tempfile::tempdir().unwrap();
    let out = make(dest.path(), &["install-init", "INIT=upstart"]);
    assert!(!out.status.success(), "install-init accepted INIT=upstart");
}

/// The init script, run with /bin/sh. Its output goes to files, not pipes:
/// a daemon that kept a pipe open would make the test wait forever.
fn init_script(script: &Path, defaults: &Path, action: &str, out_dir: &Path) -> (i32, String) {
    let out_path = out_dir.join(format!("init-{action}.out"));
    let out = fs::File::create(&out_path).unwrap();
    let status = Command::new("sh")
        .arg(script)
        .arg(action)
        .env("NOTIFD_DEFAULTS", defaults)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .expect("cannot run sh");
    let text = fs::read_to_string(&out_path).unwrap_or_default();
    (status.code().unwrap_or(-1), text)
}

#[test]
fn sysv_script_starts_reloads_and_stops_the_daemon() {
    let have_ssd = Command::new("sh")
        .args(["-c", "command -v start-stop-daemon"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_ssd {
        util::skip(
            "sysv_script_starts_reloads_and_stops_the_daemon",
            "start-stop-daemon is missing: the SysV script needs it (Debian package dpkg)",
        );
        return;
    }
    let dest = tempfile::tempdir().unwrap();
    make_ok(dest.path(), &["install-init", "INIT=sysv", "PREFIX=/usr/local", "SYSCONFDIR=/etc"]);
    let script = dest.path().join("etc/init.d/notifd");

    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let pid_file = t.join("notifd.pid");
    let log = t.join("notifd.log");
    fs::create_dir_all(t.join("db")).unwrap();
    fs::create_dir_all(t.join("spool")).unwrap();
    let conf = t.join("notifd.conf");
    fs::write(
        &conf,
        format!(
            "host = \"127.0.0.1\"\nport = 0\ndatabase = \"{}\"\nspool_dir = \"{}\"\n\
             pid_file = \"{}\"\nmail_transport = \"none\"\nlog = \"{}\"\nstore_timeout = 30\n",
            t.join("db/notifd.db").display(),
            t.join("spool").display(),
            pid_file.display(),
            log.display()
        ),
    )
    .unwrap();
    let defaults = t.join("defaults");
    fs::write(
        &defaults,
        format!(
            "DAEMON={}\nCONFIG={}\nPIDFILE={}\n",
            notifd_bin().display(),
            conf.display(),
            pid_file.display()
        ),
    )
    .unwrap();

    let mut guard = PidGuard::new(&pid_file);
    let log_text = || fs::read_to_string(&log).unwrap_or_else(|e| format!("(no log: {e})"));
    let run = |action: &str| init_script(&script, &defaults, action, t);

    let (code, out) = run("status");
    assert_eq!(code, 3, "status before start: {out}");

    // `notifd -d` returns only once it is ready: no waiting after start.
    let (code, out) = run("start");
    assert_eq!(code, 0, "start failed: {out}\n--- log\n{}", log_text());
    let pid =
        read_pid(&pid_file).unwrap_or_else(|| panic!("no pid in {} after start: {out}", pid_file.display()));
    guard.pid = Some(pid);
    assert!(alive(pid), "pid {pid} from the pid file is not running");

    let (code, out) = run("status");
    assert_eq!(code, 0, "status while running: {out}\n--- log\n{}", log_text());

    let addr = util::listen_addr_in(&log, WAIT);
    let mut c = util::Client::connect(addr);
    c.cmd("PING");
    c.expect("PONG");

    // A reload disconnects nobody, and it did reload.
    let reloads = || log_text().matches("configuration reloaded").count();
    let (code, out) = run("reload");
    assert_eq!(code, 0, "reload failed: {out}\n--- log\n{}", log_text());
    util::wait_until("the log's reload line", WAIT, || reloads() == 1);
    c.cmd("PING after reload");
    c.expect("PONG after reload");
    assert_eq!(read_pid(&pid_file), Some(pid), "the pid changed on reload");

    // Starting a running daemon is not an error, and starts no other one.
    let (code, out) = run("start");
    assert_eq!(code, 0, "second start: {out}");
    assert_eq!(read_pid(&pid_file), Some(pid));

    // stop returns once the process is gone.
    let (code, out) = run("stop");
    assert_eq!(code, 0, "stop failed: {out}\n--- log\n{}", log_text());
    assert!(!alive(pid), "pid {pid} still runs after stop");
    assert!(!pid_file.exists(), "the pid file is left after stop");
    let (code, out) = run("status");
    assert_eq!(code, 3, "status after stop: {out}");
    let (code, out) = run("stop");
    assert_eq!(code, 0, "stop when stopped: {out}");

    // The connection saw the shutdown, then EOF, within the deadline.
    c.expect("-ERR BUSY shutting down");
    c.expect_eof();

    // A pid file left by a dead process: LSB status 1.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    fs::write(&pid_file, format!("{dead_pid}\n")).unwrap();
    guard.pid = None;
    let (code, out) = run("status");
    assert_eq!(code, 1, "status with a stale pid file: {out}");
    fs::remove_file(&pid_file).unwrap();
}

#[test]
fn uninstall_removes_the_init_script_unless_it_was_edited() {
    for (init, path) in [
        ("sysv", "etc/init.d/notifd"),
        ("openrc", "etc/init.d/notifd"),
        ("systemd", "etc/systemd/system/notifd.service"),
    ] {
        let dest = tempfile::tempdir().unwrap();
        make_install(dest.path());
        make_ok(
            dest.path(),
            &["install-init", &format!("INIT={init}"), "PREFIX=/usr/local", "SYSCONFDIR=/etc"],
        );
        make_uninstall(dest.path());
        let left = files_under(dest.path());
        assert!(left.is_empty(), "INIT={init}: uninstall left files: {left:?}");

        // An edited script is the operator's: it stays, and uninstall says so.
        make_ok(
            dest.path(),
            &["install-init", &format!("INIT={init}"), "PREFIX=/usr/local", "SYSCONFDIR=/etc"],
        );
        let script = dest.path().join(path);
        let mut edited = fs::read_to_string(&script).unwrap();
        edited.push_str("# edited\n");
        fs::write(&script, &edited).unwrap();
        let out = make_ok(dest.path(), &["uninstall", "PREFIX=/usr/local", "SYSCONFDIR=/etc"]);
        assert_eq!(
            fs::read_to_string(&script).unwrap(),
            edited,
            "INIT={init}: uninstall removed an edited script"
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("keeping"), "INIT={init}: uninstall kept {path} without a word: {said}");
    }
}
