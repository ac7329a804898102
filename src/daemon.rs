//! Start-up as a Unix daemon: the configuration check, folders, the pid file, detaching
//! from the terminal and dropping privileges. Runs before the reactor; may block.
//!
//! Everything here that runs as root treats paths in folders another user can write as
//! hostile: no symbolic link is followed, a file is created with `O_EXCL`, and only a
//! file or folder just created here is given to `user`.

mod check;

pub use check::check;

use crate::config::{Config, LogTarget};
use nix::unistd::{ForkResult, Gid, Uid, User};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The umask of every process: nothing notifd creates is readable by other users.
pub const UMASK: u32 = 0o027;

static DETACHED: AtomicBool = AtomicBool::new(false);

/// Where the log goes: the `log` key, or stderr in the foreground and syslog with `-d`.
pub fn log_target(cfg: &Config) -> LogTarget {
    cfg.log.clone().unwrap_or(if DETACHED.load(Ordering::Relaxed) {
        LogTarget::Syslog
    } else {
        LogTarget::Stderr
    })
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

/// Creates `dir` if missing: its missing parents 0755 (so that `user` can reach it),
/// owned by whoever runs this, and `dir` itself 0750, owned by `user` when given.
/// An existing folder is left as it is.
pub fn make_dir(dir: &Path, user: Option<&User>) -> Result<(), String> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = dir;
    loop {
        match fs::metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(format!("cannot create {}: {} is not a folder", dir.display(), p.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(p.to_path_buf()),
            Err(e) => return Err(format!("cannot create {}: {}: {e}", dir.display(), p.display())),
        }
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    for (i, d) in missing.iter().enumerate().rev() {
        let last = i == 0;
        let mode = if last { 0o750 } else { 0o755 };
        match fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => {}
            // Made by someone else meanwhile: not ours to chown or chmod.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => continue,
            Err(e) => return Err(format!("cannot create {}: {e}", d.display())),
        }
        // Through a descriptor opened without following links, so a folder swapped for
        // a symbolic link in between is refused rather than followed.
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(d)
            .map_err(|e| format!("cannot open {} just created: {e}", d.display()))?;
        let fd = opened.as_raw_fd();
        // The umask took bits off the mode given to mkdir.
        nix::sys::stat::fchmod(fd, nix::sys::stat::Mode::from_bits_truncate(mode))
            .map_err(|e| format!("cannot chmod {}: {e}", d.display()))?;
        if let (true, Some(u)) = (last, user) {
            nix::unistd::fchown(fd, Some(u.uid), Some(u.gid))
                .map_err(|e| format!("cannot chown {}: {e}", d.display()))?;
        }
    }
    Ok(())
}

/// The folders notifd writes to, which start-up creates: the database's, the spool
/// (when used) and, with `-d`, the pid file's.
pub fn data_dirs(cfg: &Config, detach: bool) -> Vec<PathBuf> {
    let parent = |p: &Path| p.parent().map(PathBuf::from).unwrap_or_default();
    let mut dirs = vec![parent(&cfg.database)];
    if cfg.mail_transport == crate::config::Transport::Spool {
        dirs.push(cfg.spool_dir.clone());
    }
    if detach {
        dirs.push(parent(&cfg.pid_file));
    }
    dirs
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

/// Refuses to start when `pid_file` names a live process; removes a stale one. A pid
/// file that is not a regular file (a link, a FIFO) is never opened, only removed.
pub fn check_pid_file(path: &Path) -> Result<(), String> {
    let Ok(meta) = fs::symlink_metadata(path) else { return Ok(()) };
    if meta.is_file() {
        let mut text = String::new();
        let read = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .and_then(|f| f.take(64).read_to_string(&mut text));
        if let (Ok(_), Ok(pid)) = (read, text.trim().parse::<i32>()) {
            if pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
                return Err(format!("already running as pid {pid} (pid file {})", path.display()));
            }
        }
    }
    let _ = fs::remove_file(path);
    Ok(())
}

/// Writes the pid file atomically: a new temporary file (never a link someone left
/// there), then rename.
pub fn write_pid_file(path: &Path) -> Result<(), String> {
    let tmp = path.with_extension("pid.tmp");
    let _ = fs::remove_file(&tmp);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| {
            // Readable by everyone, as pid files are, whatever the umask.
            f.set_permissions(fs::Permissions::from_mode(0o644))?;
            f.write_all(format!("{}\n", std::process::id()).as_bytes())
        })
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))
}

/// Opens (creating it if missing, owned by `user`) the log file now, so that a log
/// notifd must refuse stops the start with the reason on the terminal.
pub fn prepare_log(cfg: &Config, user: Option<&User>) -> Result<(), String> {
    if let Some(u) = user {
        crate::logger::set_owner(u.uid, u.gid);
    }
    match &cfg.log {
        Some(LogTarget::File(path)) => crate::logger::open_file(path)
            .map(drop)
            .map_err(|e| format!("cannot open the log {}: {e}", path.display())),
        _ => Ok(()),
    }
}

/// After the store failed to start: why. A throw-away store process (same user, same
/// lock, same open) tries again and reports its error as text, which the caller hands
/// to the terminal even when the log is a syslog nobody reads.
pub fn store_failure(db: &Path, settings: &crate::ipc::StoreSettings) -> Option<String> {
    let (db, settings) = (db.to_path_buf(), settings.clone());
    let spawned = crate::spawn::spawn("notifd-store", "store", move |_input, output| {
        let why = match crate::store::lock(&db, std::time::Duration::ZERO) {
            Err(e) => e.to_string(),
            Ok(_held) => match crate::store::open(&db, &settings) {
                Err(e) => e.to_string(),
                Ok(_) => String::new(),
            },
        };
        let _ = fs::File::from(output).write_all(why.as_bytes());
        0
    })
    .ok()?;
    let rx = OwnedFd::from(spawned.rx);
    crate::spawn::set_blocking(&rx, true);
    let mut why = String::new();
    let _ = fs::File::from(rx).take(4096).read_to_string(&mut why);
    let _ = nix::sys::wait::waitpid(spawned.pid, None);
    let why = why.trim();
    (!why.is_empty()).then(|| why.to_string())
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
        nix::unistd::dup2(null.as_raw_fd(), fd)?;
    }
    Ok(())
}
