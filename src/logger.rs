//! The `log` backend of all three processes: stderr, syslog (facility daemon) or a file.
//!
//! Set once per process and inherited by a fork, so it can be re-pointed: a child names
//! its role with [`set_role`], and SIGHUP re-points or reopens it with [`configure`].

use crate::config::LogTarget;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

struct State {
    role: &'static str,
    target: Sink,
}

enum Sink {
    Stderr,
    Syslog,
    File(PathBuf, File),
}

static STATE: Mutex<State> = Mutex::new(State { role: "reactor", target: Sink::Stderr });

/// The uid and gid (`uid << 32 | gid`) a log file must belong to; `u64::MAX`: the
/// process's own.
static OWNER: AtomicU64 = AtomicU64::new(u64::MAX);

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Only one thread per process exists, so this lock is never contended; a poisoned
        // lock still holds a usable sink.
        let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let level = record.level().as_str().to_ascii_lowercase();
        let role = st.role;
        match &mut st.target {
            Sink::Syslog => {
                let prio = match record.level() {
                    log::Level::Error => libc::LOG_ERR,
                    log::Level::Warn => libc::LOG_WARNING,
                    log::Level::Info => libc::LOG_INFO,
                    log::Level::Debug | log::Level::Trace => libc::LOG_DEBUG,
                };
                let text = format!("{role}: {}", record.args()).replace('\0', " ");
                if let Ok(c) = CString::new(text) {
                    // SAFETY: "%s" with one valid C string argument.
                    unsafe { libc::syslog(prio | libc::LOG_DAEMON, c"%s".as_ptr(), c.as_ptr()) };
                }
            }
            sink => {
                let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
                let line =
                    format!("{now} notifd[{}]: {}: {level}: {}\n", std::process::id(), role, record.args());
                // A full disk or closed stderr must not take the daemon down: drop the line.
                let _ = match sink {
                    Sink::File(_, f) => f.write_all(line.as_bytes()),
                    _ => std::io::stderr().write_all(line.as_bytes()),
                };
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (once per program) at `level`, writing to stderr.
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&Logger);
    log::set_max_level(level);
}

/// Names this process in every line: `reactor`, `store` or `mailer`.
pub fn set_role(role: &'static str) {
    STATE.lock().unwrap_or_else(|e| e.into_inner()).role = role;
}

/// Points the log at `target` (reopening a file, for logrotate) and sets the level.
pub fn configure(target: &LogTarget, level: log::LevelFilter) -> std::io::Result<()> {
    let sink = match target {
        LogTarget::Stderr => Sink::Stderr,
        LogTarget::Syslog => {
            // SAFETY: the ident is a static C string, as openlog keeps the pointer.
            unsafe { libc::openlog(c"notifd".as_ptr(), libc::LOG_PID | libc::LOG_NDELAY, libc::LOG_DAEMON) };
            Sink::Syslog
        }
        LogTarget::File(path) => Sink::File(path.clone(), open_file(path)?),
    };
    STATE.lock().unwrap_or_else(|e| e.into_inner()).target = sink;
    log::set_max_level(level);
    Ok(())
}

/// The user a log file must belong to: the one notifd runs as once privileges are
/// dropped. Set by a root parent before it opens the log; inherited by its children.
pub fn set_owner(uid: nix::unistd::Uid, gid: nix::unistd::Gid) {
    OWNER.store(u64::from(uid.as_raw()) << 32 | u64::from(gid.as_raw()), Ordering::Relaxed);
}

/// Opens the log file for appending, creating it (0640) if missing. Never follows a
/// symbolic link, and refuses an existing file that is not a regular file owned by the
/// user notifd runs as; the owner is set only on a file this call created, so a root
/// notifd can never be made to hand someone else's file to its service account.
pub fn open_file(path: &Path) -> std::io::Result<File> {
    let owner = OWNER.load(Ordering::Relaxed);
    let (uid, gid) = if owner == u64::MAX {
        (nix::unistd::geteuid(), nix::unistd::getegid())
    } else {
        (nix::unistd::Uid::from_raw((owner >> 32) as u32), nix::unistd::Gid::from_raw(owner as u32))
    };
    let open = |create: bool| {
        OpenOptions::new()
            .append(true)
            .create_new(create)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    };
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let (file, created) = match open(false) {
        Ok(f) => (f, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match open(true) {
            Ok(f) => (f, true),
            // Someone made it between the two calls: judge what is there now.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (open(false)?, false),
            Err(e) => return Err(e),
        },
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refuse(format!("{} is a symbolic link; refusing to follow it", path.display())))
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refuse(format!("{} is not a regular file", path.display())));
    }
    if created {
        if meta.uid() != uid.as_raw() || meta.gid() != gid.as_raw() {
            nix::unistd::fchown(std::os::fd::AsRawFd::as_raw_fd(&file), Some(uid), Some(gid))?;
        }
    } else if meta.uid() != uid.as_raw() {
        return Err(refuse(format!(
            "{} belongs to uid {}, not to uid {} that notifd runs as; refusing to write to it \
             (chown it or remove it)",
            path.display(),
            meta.uid(),
            uid
        )));
    }
    // O_NONBLOCK was for the open only (a FIFO planted there must not hang us).
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
    unsafe {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) & !libc::O_NONBLOCK);
    }
    Ok(file)
}

/// In a freshly forked child, before it closes every inherited descriptor: lets go of
/// the log's own descriptor (the syslog socket or the file), so that a later write can
/// never land on a descriptor number the child reuses for its pipes. Returns what to
/// reopen with [`restore`].
pub fn release() -> Option<LogTarget> {
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let was = std::mem::replace(&mut st.target, Sink::Stderr);
    match was {
        Sink::Stderr => None,
        Sink::Syslog => {
            // SAFETY: closelog has no preconditions.
            unsafe { libc::closelog() };
            Some(LogTarget::Syslog)
        }
        Sink::File(path, f) => {
            drop(f);
            Some(LogTarget::File(path))
        }
    }
}

/// Reopens what [`release`] let go of; on failure the child logs to stderr.
pub fn restore(target: Option<LogTarget>) {
    if let Some(t) = target {
        if let Err(e) = configure(&t, log::max_level()) {
            log::warn!("cannot reopen the log: {e}");
        }
    }
}

/// Reopens the log file, if the log is a file (after logrotate moved it away).
pub fn reopen() -> std::io::Result<()> {
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Sink::File(path, f) = &mut st.target {
        *f = open_file(path)?;
    }
    Ok(())
}

/// Applies a [`crate::ipc::LogSettings`] record in a child.
pub fn apply(s: &crate::ipc::LogSettings) {
    if let Err(e) = configure(&s.target, s.level) {
        log::warn!("cannot reopen the log: {e}");
    }
}
