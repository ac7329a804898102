//! Forking a child process (store or mailer) that holds nothing but its own two pipe ends.
//!
//! A child forked by a running reactor inherits client sockets, the listener, the poll
//! instance, the other children's pipes and signal handlers. Right after the fork it
//! moves its pipe ends to fds 3 and 4, closes every other descriptor above 2, resets the
//! signal mask and dispositions (ignoring INT, TERM and HUP, which are for the parent),
//! asks for SIGKILL when the parent dies, and names itself for `ps -o comm`.

use mio::unix::pipe::{Receiver, Sender};
use nix::sys::signal::{sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::{fork, ForkResult, Pid};
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
    // SAFETY: the reactor is single-threaded, so the child cannot inherit a lock held by
    // another thread; the child only calls async-signal-safe functions until it has
    // closed every inherited descriptor, and then runs ordinary single-threaded code.
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
            // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            if nix::unistd::getppid() != parent {
                // The parent died before PDEATHSIG was armed.
                std::process::exit(0);
            }
            set_name(name);
            // The reactor is what clients wait on: when a child and the reactor want the
            // same CPU, the reactor should win. Batches in a child only grow a little.
            // SAFETY: setpriority on this process; raising niceness needs no privilege.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, CHILD_NICENESS) };
            crate::logger::set_role(role);
            std::process::exit(body(input, output));
        }
    }
}

/// Moves the pipe ends to fds 3 and 4 and closes every other descriptor above 2.
fn keep_only(input: OwnedFd, output: OwnedFd) -> (OwnedFd, OwnedFd) {
    // Duplicate above the low numbers first, so that moving to 3 and 4 cannot clobber
    // one end with the other.
    let high_in = dup_above(input.as_raw_fd(), 100);
    let high_out = dup_above(output.as_raw_fd(), 100);
    // SAFETY: dup2 onto fixed numbers; the old descriptors are closed by close_range below.
    unsafe {
        libc::dup2(high_in, 3);
        libc::dup2(high_out, 4);
    }
    std::mem::forget(input);
    std::mem::forget(output);
    // SAFETY: closes descriptors this process does not own any more; fds 3 and 4 are
    // re-owned just below and nothing else is used afterwards.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32) != 0 {
            for fd in 5..1024 {
                libc::close(fd);
            }
        }
    }
    // SAFETY: fds 3 and 4 are open and owned by nobody else in this process.
    let (input, output) = unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4)) };
    set_cloexec(&input);
    set_cloexec(&output);
    (input, output)
}

fn dup_above(fd: i32, min: i32) -> i32 {
    // SAFETY: F_DUPFD on an open descriptor.
    unsafe { libc::fcntl(fd, libc::F_DUPFD, min) }
}

fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: F_SETFD on an open descriptor.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
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
        // SAFETY: installing SIG_IGN or SIG_DFL is always sound.
        let _ = unsafe { nix::sys::signal::signal(sig, handler) };
    }
}

/// Sets the process name shown by `ps -o comm` (at most 15 bytes).
pub fn set_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

/// Asks for a 1 MiB pipe buffer, so a burst of records needs fewer wake-ups; the kernel
/// may refuse (pipe-max-size), which only costs speed.
fn grow_pipe(fd: &impl AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on an open pipe descriptor.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}

/// Makes a child's pipe end blocking (the child waits on its parent as it likes).
pub fn set_blocking(fd: &OwnedFd, blocking: bool) {
    // SAFETY: F_GETFL/F_SETFL on an open descriptor.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        let fl = if blocking { fl & !libc::O_NONBLOCK } else { fl | libc::O_NONBLOCK };
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl);
    }
}
