//! One client connection: socket, bounded input and output, replies in command order,
//! live subscriptions. Kept small: an idle connection should cost a few hundred bytes.

use super::subs::Subs;
use super::tls_conn::TlsConn;
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Reading commands.
    Open,
    /// QUIT, EOF or a third failed AUTH: no more commands are read; the connection
    /// closes once every reply is out.
    Draining,
    /// The server is stopping: no more commands are read; the connection gets its
    /// replies, then `-ERR BUSY shutting down`, then is closed.
    Stopping,
    /// To be closed at the end of this loop turn, without flushing more.
    Closing,
}

/// A reply slot, in command order. A ready reply waits behind an earlier one that is not.
pub struct Slot {
    /// The reply is complete.
    pub done: bool,
    /// Its bytes so far (a LIST reply grows chunk by chunk).
    pub data: Vec<u8>,
}

/// A client connection.
pub struct Conn {
    /// Unique over the daemon's life, so a late store answer never reaches a newer
    /// connection that reuses the same slab key.
    pub id: u64,
    /// The socket, registered with the reactor's poll under the slab key.
    pub sock: TcpStream,
    /// The client's address (an IPv4-mapped IPv6 address as IPv4).
    pub peer: SocketAddr,
    /// Where it is in its life.
    pub state: State,
    /// Bytes read but not yet taken as lines: at most `max_line` of a partial line, or
    /// more while command processing is paused.
    pub inbuf: Vec<u8>,
    /// The rest of an over-long line is being dropped.
    pub discarding: bool,
    /// Bytes to send; written once per loop turn.
    pub out: Vec<u8>,
    /// `MSG` bytes of this turn to send before anything in `out`, as a range of the
    /// reactor's fan-out buffer, where each publication is formatted once for all its
    /// subscribers. Only in use while `out` is empty; empty again after every turn.
    pub shared: (u32, u32),
    /// Replies not yet moved to `out`, oldest first; `first_seq` numbers the front one.
    pub slots: VecDeque<Slot>,
    /// The sequence number of the front slot.
    pub first_seq: u64,
    /// Live subscriptions: (event, email) pairs.
    pub subs: Subs,
    /// The `publish_token` generation this connection authenticated with (0: none).
    pub auth_gen: u64,
    /// Wrong tokens so far; the third closes the connection.
    pub auth_failures: u8,
    /// From a loopback address: may PUB and LIST without a token.
    pub loopback: bool,
    /// The trust its live pairs are counted under in the offline policy's index
    /// (`subs::LiveAddrs`); moved when the connection's trust changes.
    pub live_trusted: bool,
    /// On the reactor's list of connections to write at the end of the turn.
    pub dirty: bool,
    /// Reading stopped (max_inflight, store backlog, no ids); waiting to be resumed.
    pub paused: bool,
    /// The peer closed its sending side.
    pub eof: bool,
    /// The coarse clock (whole seconds, see `limits::Sweep`) at its last line, for
    /// `idle_timeout`; for a dropped connection, when it was dropped.
    pub last_cmd: u32,
    /// Its unsent bytes as last added to the reactor's total (`max_pending_total`).
    pub counted: usize,
    /// Dropped with `-ERR BUSY`: draining its last line, closed after a short linger.
    pub lingering: bool,
    /// Its replays (SINCE) under way; `None` for almost every connection, so that the
    /// publish path pays one branch for replay.
    pub replay: Option<Box<super::replay::ConnReplays>>,
    /// [tls] Ciphertext the socket has not taken yet (always 0 for a plain connection):
    /// counted as unsent, like `out`.
    pub held: u32,
    /// [tls] The rustls state of a connection from the TLS port; boxed, so that a plain
    /// connection pays one pointer for it.
    pub tls: Option<Box<TlsConn>>,
}

impl Conn {
    /// A new connection, open, with nothing to send yet.
    pub fn new(id: u64, sock: TcpStream, peer: SocketAddr, now: u32) -> Conn {
        let loopback = match peer.ip() {
            std::net::IpAddr::V4(a) => a.is_loopback(),
            std::net::IpAddr::V6(a) => {
                a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        };
        Conn {
            id,
            sock,
            peer,
            state: State::Open,
            inbuf: Vec::new(),
            discarding: false,
            out: Vec::new(),
            shared: (0, 0),
            slots: VecDeque::new(),
            first_seq: 0,
            subs: Subs::default(),
            auth_gen: 0,
            auth_failures: 0,
            loopback,
            live_trusted: false,
            dirty: false,
            paused: false,
            eof: false,
            last_cmd: now,
            counted: 0,
            lingering: false,
            replay: None,
            held: 0,
            tls: None,
        }
    }

    /// Holds a live subscription, so it is never closed for being idle.
    pub fn is_subscriber(&self) -> bool {
        self.subs.len() > 0
    }

    /// Adds a slot for a reply that comes later; returns its sequence number.
    pub fn push_waiting(&mut self) -> u64 {
        self.slots.push_back(Slot { done: false, data: Vec::new() });
        self.first_seq + self.slots.len() as u64 - 1
    }

    /// Moves this turn's shared `MSG` bytes into `out`, before anything else goes there.
    pub fn unshare(&mut self, fan: &[u8]) {
        let (a, b) = (self.shared.0 as usize, self.shared.1 as usize);
        if a < b {
            self.out.extend_from_slice(&fan[a..b]);
            self.shared = (0, 0);
        }
    }

    /// Bytes waiting to be sent, live lines held by a replay included.
    pub fn unsent(&self) -> usize {
        let held = self.replay.as_ref().map_or(0, |r| r.held_bytes());
        self.out.len() + (self.shared.1 - self.shared.0) as usize + held + self.held as usize
    }

    /// A reply that is ready now: straight to the output when nothing waits before it.
    pub fn reply(&mut self, fan: &[u8], write: impl FnOnce(&mut Vec<u8>)) {
        self.unshare(fan);
        if self.slots.is_empty() {
            write(&mut self.out);
        } else {
            let mut data = Vec::new();
            write(&mut data);
            self.slots.push_back(Slot { done: true, data });
        }
    }

    /// The slot numbered `seq`, if it is still waiting.
    pub fn slot(&mut self, seq: u64) -> Option<&mut Slot> {
        let i = seq.checked_sub(self.first_seq)?;
        self.slots.get_mut(usize::try_from(i).ok()?)
    }

    /// Moves finished replies at the front to the output, in order.
    pub fn drain_slots(&mut self) {
        while self.slots.front().is_some_and(|s| s.done) {
            let s = self.slots.pop_front().expect("front exists");
            if self.out.is_empty() {
                self.out = s.data;
            } else {
                self.out.extend_from_slice(&s.data);
            }
            self.first_seq += 1;
        }
        if self.slots.is_empty() && self.slots.capacity() > 0 {
            // An idle connection should hold no reply memory.
            self.slots = VecDeque::new();
        }
    }

    /// Writes as much of `out` as the socket takes. `Err` means the connection is dead.
    pub fn flush(&mut self, fan: &[u8]) -> io::Result<()> {
        if self.tls.is_some() {
            // [tls] Through rustls.
            return self.flush_tls(fan);
        }
        let (a, b) = (self.shared.0 as usize, self.shared.1 as usize);
        if a < b {
            // Straight from the fan-out buffer; only what the socket does not take now
            // is copied, since the buffer is reused next turn.
            self.shared = (0, 0);
            let sent = write_some(&mut self.sock, &fan[a..b])?;
            self.out.extend_from_slice(&fan[a + sent..b]);
            return Ok(());
        }
        let written = write_some(&mut self.sock, &self.out)?;
        if written == self.out.len() {
            // Give the memory back: most connections are idle most of the time.
            self.out = Vec::new();
        } else {
            self.out.drain(..written);
        }
        Ok(())
    }

    /// Everything sent and answered, so a draining connection may close.
    pub fn finished(&self) -> bool {
        self.state == State::Draining && self.slots.is_empty() && self.out.is_empty() && self.held == 0
    }
}

/// Writes what the socket takes of `buf` now; returns how much.
pub(super) fn write_some(sock: &mut TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < buf.len() {
        match sock.write(&buf[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}
