//! The reactor's side of one child process: its pipes, a bounded outgoing buffer, the
//! frames coming back, and restarts with backoff.

use crate::ipc::{self, Filled, FrameError, FrameReader};
use crate::spawn::Spawned;
use mio::unix::pipe::{Receiver, Sender};
use mio::{Interest, Registry, Token};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// First restart delay; doubles per quick death, up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A child that lived this long is healthy again: the next death restarts it quickly.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Reads from a child per turn before the other events get their turn.
const READ_BUDGET: usize = 4 << 20;

/// One supervised child.
pub struct Child {
    /// `notifd-store`, `notifd-mailer 1`: for the log.
    pub name: String,
    /// Its pid, from the fork until it is reaped.
    pub pid: Option<Pid>,
    tx: Option<Sender>,
    rx: Option<Receiver>,
    /// Encoded records not yet written to the pipe, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    reader: FrameReader,
    /// Its `Hello` has arrived.
    pub greeted: bool,
    started: Instant,
    backoff: Duration,
    /// When it is dead: when to fork it again.
    pub restart_at: Option<Instant>,
    /// Times it was forked; all but the first are restarts.
    pub starts: u64,
    rx_token: Token,
    tx_token: Token,
}

impl Child {
    /// A child not forked yet, whose pipes will be polled under these tokens.
    pub fn new(name: String, rx_token: Token, tx_token: Token) -> Child {
        Child {
            name,
            pid: None,
            tx: None,
            rx: None,
            out: Vec::new(),
            out_pos: 0,
            reader: FrameReader::default(),
            greeted: false,
            started: Instant::now(),
            backoff: MIN_BACKOFF,
            restart_at: None,
            starts: 0,
            rx_token,
            tx_token,
        }
    }

    /// Takes over a freshly forked child and registers its pipes.
    pub fn attach(&mut self, mut s: Spawned, registry: &Registry) -> io::Result<()> {
        registry.register(&mut s.rx, self.rx_token, Interest::READABLE)?;
        registry.register(&mut s.tx, self.tx_token, Interest::WRITABLE)?;
        self.pid = Some(s.pid);
        self.tx = Some(s.tx);
        self.rx = Some(s.rx);
        self.out.clear();
        self.out_pos = 0;
        self.reader = FrameReader::default();
        self.greeted = false;
        self.started = Instant::now();
        self.restart_at = None;
        self.starts += 1;
        Ok(())
    }

    /// The child is running (its pipes are open).
    pub fn up(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one record; it is written by `flush`.
    pub fn send<T: Serialize>(&mut self, msg: &T) {
        if self.tx.is_some() {
            ipc::encode(msg, &mut self.out);
        }
    }

    /// Bytes queued and not yet taken by the pipe.
    pub fn backlog(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Writes what the pipe takes. `Err`: the child is gone.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(tx) = self.tx.as_mut() else { return Ok(()) };
        while self.out_pos < self.out.len() {
            match tx.write(&self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > 8 << 20 {
                self.out = Vec::new();
            }
        } else if self.out_pos > (1 << 20) {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }

    /// Reads what the pipe holds, bounded per turn; a child whose pipes are closed
    /// reads as `Eof`.
    pub fn read(&mut self) -> io::Result<Filled> {
        let Some(rx) = self.rx.as_mut() else { return Ok(Filled::Eof) };
        self.reader.fill_from(rx, READ_BUDGET)
    }

    /// The next whole record read from the child.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        self.reader.next_frame()
    }

    /// Forgets the dead child's pipes and schedules the restart. The caller reaps it.
    pub fn lost(&mut self, registry: &Registry, now: Instant) {
        if let Some(mut rx) = self.rx.take() {
            let _ = registry.deregister(&mut rx);
        }
        if let Some(mut tx) = self.tx.take() {
            let _ = registry.deregister(&mut tx);
        }
        if let Some(pid) = self.pid {
            // It may still run (a broken frame, not a death): make sure it is gone.
            let _ = kill(pid, Signal::SIGKILL);
        }
        if now.duration_since(self.started) >= HEALTHY_AFTER {
            self.backoff = MIN_BACKOFF;
        }
        self.restart_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.out.clear();
        self.out_pos = 0;
        self.greeted = false;
    }

    /// Closes the pipe to the child, which then finishes what it holds and exits.
    pub fn close_input(&mut self, registry: &Registry) {
        let _ = self.flush();
        if let Some(mut tx) = self.tx.take() {
            let _ = registry.deregister(&mut tx);
        }
    }
}
