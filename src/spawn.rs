//! Forking a child process (store or mailer) that holds nothing but its own two pipe ends.
//!
//! A child forked by a running reactor inherits client sockets, the listener, the poll
//! instance, the other children's pipes and signal handlers. Right after the fork it
//! moves its pipe ends to fds 3 and 4, closes every other descriptor above 2, resets the
//! signal mask and dispositions (ignoring INT, TERM and HUP, which are for the parent),
//! asks for SIGKILL when the parent dies, and names itself for `ps -o comm`.

use mio::unix::pipe::{Receiver, Sender};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::prctl;
use nix::sys::signal::{sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::{dup2, fork, ForkResult, Pid};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How much nicer than the reactor a child runs.
const CHILD_NICENESS: i32 = 5;

/// The reactor's ends of a new child's pipes.
pub struct Spawned {
    /// The child's pid.
    pub pid: Pid,
    /// Reactor → child, non-blocking.
    pub tx: Sender,
    /// Child → reactor, non-blocking.
    pub rx: Receiver,
}

/// Forks a child named `name` (at most 15 bytes) that runs `body(input, output)` and
/// exits with its status. `body` must never return into the parent's code paths.
pub fn spawn(
    name: &'static str,
    role: &'static str,
    body: impl FnOnce(OwnedFd, OwnedFd) -> i32,
) -> io::Result<Spawned> {
    let (to_child_tx, to_child_rx) = mio::unix::pipe::new()?;
    let (from_child_tx, from_child_rx) = mio::unix::pipe::new()?;
    let parent = nix::unistd::getpid();
    // SAFETY: fork is sound here because the reactor process has one thread at every
    // fork (notifd starts no thread in it: signals come through signal-hook-mio's
    // self-pipe, SQLite and lettre run only in the children, and `daemon::detach` forks
    // before any of this). So no lock (malloc's, the logger's Mutex, stdio's) can be held
    // by a thread that does not exist in the child, and the child may run ordinary Rust
    // code — allocate, log, open files — rather than only async-signal-safe calls. What
    // the child must still do, and does below: drop every descriptor it inherited
    // except its two pipe ends before it runs `body` (so it never touches the parent's
    // poll instance, sockets or the other children's pipes), reset the signal handlers
    // the parent installed, and never return into the parent's code paths: `body` runs
    // and the child exits.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Parent { child } => {
            drop(to_child_rx);
            drop(from_child_tx);
            grow_pipe(&to_child_tx);
            grow_pipe(&from_child_rx);
            Ok(Spawned { pid: child, tx: to_child_tx, rx: from_child_rx })
        }
        ForkResult::Child => {
            let log = crate::logger::release();
            let (input, output) = keep_only(OwnedFd::from(to_child_rx), OwnedFd::from(from_child_tx));
            crate::logger::restore(log);
            reset_signals();
            let _ = prctl::set_pdeathsig(Signal::SIGKILL);
            if nix::unistd::getppid() != parent {
                // The parent died before PDEATHSIG was armed.
                std::process::exit(0);
            }
            set_name(name);
            // The reactor is what clients wait on: when a child and the reactor want the
            // same CPU, the reactor should win. Batches in a child only grow a little.
            // nix has no setpriority.
            // SAFETY: setpriority on this process, with no pointer; raising the niceness
            // needs no privilege, and a failure only leaves the child as nice as the parent.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, CHILD_NICENESS) };
            crate::logger::set_role(role);
            std::process::exit(body(input, output));
        }
    }
}

/// Moves the pipe ends to fds 3 and 4 and closes every other descriptor above 2.
fn keep_only(input: OwnedFd, output: OwnedFd) -> (OwnedFd, OwnedFd) {
    // Duplicate to 5 or above first, so that moving to 3 and 4 cannot clobber one end
    // with the other (not higher: a low open-files limit must still let a child start). A failure here leaves the child without its pipes: it
    // then fails its first read or write and exits, and the reactor restarts it.
    let high_in = fcntl(input.as_raw_fd(), FcntlArg::F_DUPFD(5)).unwrap_or(-1);
    let high_out = fcntl(output.as_raw_fd(), FcntlArg::F_DUPFD(5)).unwrap_or(-1);
    let _ = dup2(high_in, 3);
    let _ = dup2(high_out, 4);
    // Closed with everything else just below, by number.
    std::mem::forget(input);
    std::mem::forget(output);
    // nix has no close_range.
    // SAFETY: closes descriptors by number; the only ones this process still owns as
    // Rust objects are 0 to 2 (stdio) and 3 and 4 (re-owned just below), so nothing
    // closed here is used afterwards.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32) != 0 {
            for fd in 5..1024 {
                libc::close(fd);
            }
        }
    }
    // SAFETY: fds 3 and 4 are open (the dup2 above) and owned by nothing else in this
    // process: whatever held those numbers before was closed by dup2.
    let (input, output) = unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4)) };
    let _ = fcntl(3, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    let _ = fcntl(4, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    (input, output)
}

/// Children ignore the signals meant for the parent and take the defaults for the rest.
fn reset_signals() {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        let handler = match sig {
            // INT/TERM/HUP go to the whole process group from a terminal or an init
            // system; the parent decides. PIPE shows up as EPIPE instead.
            Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP | Signal::SIGPIPE => SigHandler::SigIgn,
            _ => SigHandler::SigDfl,
        };
        // SAFETY: installing SIG_IGN or SIG_DFL runs no code of ours in a handler, so
        // nothing can break async-signal-safety; nix makes every `signal` call need this.
        let _ = unsafe { nix::sys::signal::signal(sig, handler) };
    }
}

/// Sets the process name shown by `ps -o comm` (the kernel keeps at most 15 bytes).
pub fn set_name(name: &str) {
    let bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
    if let Ok(name) = CString::new(bytes) {
        let _ = prctl::set_name(&name);
    }
}

/// Asks for a 1 MiB pipe buffer, so a burst of records needs fewer wake-ups; the kernel
/// may refuse (pipe-max-size), which only costs speed.
fn grow_pipe(fd: &impl AsRawFd) {
    let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(1 << 20));
}

/// Makes a child's pipe end blocking or not (the child waits on its parent as it likes).
pub fn set_blocking(fd: &OwnedFd, blocking: bool) {
    let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) else { return };
    let mut flags = OFlag::from_bits_truncate(flags);
    flags.set(OFlag::O_NONBLOCK, !blocking);
    let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags));
}
