//! Start-up as a Unix daemon: the configuration check, folders, the pid file, detaching
//! from the terminal and dropping privileges. Runs before the reactor; may block.

use crate::config::Transport;
use crate::config::{Config, LogTarget};
use nix::unistd::{chown, ForkResult, Gid, Uid, User};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

static DETACHED: AtomicBool = AtomicBool::new(false);

/// Where the log goes: the `log` key, or stderr in the foreground and syslog with `-d`.
pub fn log_target(cfg: &Config) -> LogTarget {
    cfg.log.clone().unwrap_or(if DETACHED.load(Ordering::Relaxed) {
        LogTarget::Syslog
    } else {
        LogTarget::Stderr
    })
}

/// `-t`: is everything the configuration names usable? Creates nothing.
pub fn check(cfg: &Config) -> Result<(), String> {
    crate::listen::resolve(&cfg.host, cfg.port).map_err(|e| format!("host: {e}"))?;
    writable_or_creatable(&cfg.database).map_err(|e| format!("database {}: {e}", cfg.database.display()))?;
    match cfg.mail_transport {
        Transport::Spool => writable_or_creatable(&cfg.spool_dir)
            .map_err(|e| format!("spool_dir {}: {e}", cfg.spool_dir.display()))?,
        Transport::Sendmail => {
            let ok = fs::metadata(&cfg.sendmail_path)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if !ok {
                return Err(format!("sendmail_path {}: not an executable file", cfg.sendmail_path.display()));
            }
        }
        Transport::Smtp | Transport::None => {}
    }
    let mail = cfg.mail_settings()?;
    crate::transport::Mailer::new(&mail).map_err(|e| e.to_string())?;
    if !cfg.user.is_empty() {
        match User::from_name(&cfg.user) {
            Ok(Some(_)) => {}
            _ => return Err(format!("user \"{}\": no such user", cfg.user)),
        }
    }
    Ok(())
}

/// `path` exists and is writable, or the nearest folder above it that exists is.
fn writable_or_creatable(path: &Path) -> Result<(), String> {
    let mut p = path;
    loop {
        if p.exists() {
            return nix::unistd::access(p, nix::unistd::AccessFlags::W_OK)
                .map_err(|e| format!("not writable: {e}"));
        }
        p = p.parent().ok_or("no existing parent folder")?;
        if p.as_os_str().is_empty() {
            p = Path::new(".");
        }
    }
}

/// The account to run as, when started as root with `user` set.
pub fn target_user(cfg: &Config) -> Result<Option<User>, String> {
    if cfg.user.is_empty() || !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name(&cfg.user) {
        Ok(Some(u)) => Ok(Some(u)),
        Ok(None) => Err(format!("user \"{}\": no such user", cfg.user)),
        Err(e) => Err(format!("user \"{}\": {e}", cfg.user)),
    }
}

/// Creates a missing folder (mode 0750) owned by `user`.
pub fn make_dir(dir: &Path, user: Option<&User>) -> Result<(), String> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if let Some(u) = user {
        chown(dir, Some(u.uid), Some(u.gid)).map_err(|e| format!("cannot chown {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Creates `path` if missing and gives it to `user` (mode 0640).
pub fn own_file(path: &Path, user: &User) -> Result<(), String> {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    nix::unistd::fchown(f.as_raw_fd(), Some(user.uid), Some(user.gid))
        .map_err(|e| format!("cannot chown {}: {e}", path.display()))
}

/// Switches to `user`: supplementary groups, then gid, then uid; refuses to go on if any
/// step fails or root can be regained.
pub fn drop_privileges(user: &User) -> Result<(), String> {
    let name = std::ffi::CString::new(user.name.as_str()).map_err(|_| "user name has a NUL".to_string())?;
    nix::unistd::initgroups(&name, user.gid).map_err(|e| format!("initgroups: {e}"))?;
    nix::unistd::setgid(user.gid).map_err(|e| format!("setgid: {e}"))?;
    nix::unistd::setuid(user.uid).map_err(|e| format!("setuid: {e}"))?;
    if user.uid != Uid::from_raw(0) && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err("could regain root after dropping privileges".into());
    }
    if Gid::effective() != user.gid {
        return Err("group did not change".into());
    }
    Ok(())
}

/// Refuses to start when `pid_file` names a live process; removes a stale one.
pub fn check_pid_file(path: &Path) -> Result<(), String> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(()) };
    if let Ok(pid) = text.trim().parse::<i32>() {
        if pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
            return Err(format!("already running as pid {pid} (pid file {})", path.display()));
        }
    }
    let _ = fs::remove_file(path);
    Ok(())
}

/// Writes the pid file atomically (temporary name, then rename).
pub fn write_pid_file(path: &Path) -> Result<(), String> {
    let tmp = path.with_extension("pid.tmp");
    fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)))
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))
}

/// The daemon's end of the start-up report to the foreground process.
pub struct Ready(Option<OwnedFd>);

impl Ready {
    /// Nothing to report to: running in the foreground.
    pub fn foreground() -> Ready {
        Ready(None)
    }

    /// Start-up went well: the foreground process exits 0.
    pub fn ok(&mut self) {
        if let Some(fd) = self.0.take() {
            let _ = fs::File::from(fd).write_all(b"ok\n");
        }
    }

    /// Start-up failed: the foreground process prints `why` and exits 1.
    pub fn fail(&mut self, why: &str) {
        if let Some(fd) = self.0.take() {
            let _ = fs::File::from(fd).write_all(why.as_bytes());
        }
    }
}

/// `-d`: fork, setsid, fork again, chdir /. The foreground process waits until the
/// daemon says it is ready (or why not) and exits with that; only the daemon returns.
pub fn detach() -> Result<Ready, String> {
    let (rx, tx) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: no other thread exists yet.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => {
            drop(tx);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut report = String::new();
            let _ = fs::File::from(rx).read_to_string(&mut report);
            if report == "ok\n" {
                std::process::exit(0);
            }
            if report.is_empty() {
                report = "the daemon exited during start-up (see the log)".into();
            }
            eprintln!("notifd: {report}");
            std::process::exit(1);
        }
        ForkResult::Child => {}
    }
    drop(rx);
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    // SAFETY: still single-threaded.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        // The session leader leaves, so the daemon can never regain a terminal.
        ForkResult::Parent { .. } => std::process::exit(0),
        ForkResult::Child => {}
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    DETACHED.store(true, Ordering::Relaxed);
    Ok(Ready(Some(tx)))
}

/// Points stdin, stdout and stderr at /dev/null, once the daemon no longer needs them.
pub fn close_stdio() -> io::Result<()> {
    let null = fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 of an open descriptor onto 0, 1 or 2.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
    Ok(())
}
