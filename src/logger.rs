//! The `log` backend of all three processes: stderr, syslog (facility daemon) or a file.
//!
//! Set once per process and inherited by a fork, so it can be re-pointed: a child names
//! its role with [`set_role`], and SIGHUP re-points or reopens it with [`configure`].

use crate::config::LogTarget;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
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
        LogTarget::File(path) => {
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            Sink::File(path.clone(), f)
        }
    };
    STATE.lock().unwrap_or_else(|e| e.into_inner()).target = sink;
    log::set_max_level(level);
    Ok(())
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
        *f = OpenOptions::new().create(true).append(true).open(&*path)?;
    }
    Ok(())
}

/// Applies a [`crate::ipc::LogSettings`] record in a child.
pub fn apply(s: &crate::ipc::LogSettings) {
    if let Err(e) = configure(&s.target, s.level) {
        log::warn!("cannot reopen the log: {e}");
    }
}
