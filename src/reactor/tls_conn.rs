//! TLS connections: the TLS listener, and the rustls state of one connection between its
//! socket and the ordinary line path.
//!
//! A TLS connection is an ordinary [`Conn`] (same limits, same commands, same output
//! buffers) whose socket I/O goes through a [`TlsConn`]: reading turns ciphertext into
//! plaintext for the line path; flushing hands a turn's plaintext to rustls in one
//! `write_all`, so that a turn's `MSG` lines leave in as few records as their size allows
//! (one per 16 KiB), not one per line. Ciphertext the socket does not take is held here
//! and counted in [`Conn::held`], so that a slow TLS consumer meets `max_pending` as a
//! plain one does. rustls is sans-I/O: no thread, no async runtime, as in its mio example.
//!
//! Handshakes are bounded: [`Handshakes`] lists them in accept order, and the loop closes
//! those still unfinished after [`HANDSHAKE_TIMEOUT`], with the clock it reads once a turn
//! anyway.

use super::conn::{write_some, Conn};
use super::Reactor;
use mio::net::{TcpListener, TcpStream};
use rustls::{ServerConfig, ServerConnection};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a client has to finish its TLS handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS handshake record: a ClientHello sent to the plain port.
pub(super) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The TLS side of the reactor: the listener, the configuration new connections start
/// with, and the handshakes under way.
#[derive(Default)]
pub(super) struct TlsSide {
    /// The TLS listener; `None` without `tls_cert_file`, or once the daemon is stopping.
    pub(super) listener: Option<TcpListener>,
    /// What a new connection starts with; a reload replaces it, and open connections keep
    /// the `Arc` they started with.
    pub(super) config: Option<Arc<ServerConfig>>,
    /// Connections in their handshake: (deadline, slab key, connection id), in accept
    /// order, so in deadline order.
    pub(super) handshakes: Handshakes,
}

/// Handshakes under way, oldest first.
#[derive(Default)]
pub(super) struct Handshakes(VecDeque<(Instant, usize, u64)>);

impl Handshakes {
    /// The earliest deadline, for the poll timeout.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.0.front().map(|h| h.0)
    }
}

/// The rustls state of one connection.
pub struct TlsConn {
    conn: ServerConnection,
    /// Ciphertext the socket did not take yet; written before anything newer.
    cipher: Vec<u8>,
    /// The handshake finished and the client presented a certificate verified by
    /// `tls_client_ca_file` (PROTOCOL.md *Trust*).
    pub trusted: bool,
}

impl TlsConn {
    fn new(config: Arc<ServerConfig>) -> Result<TlsConn, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        // Bounded by max_pending instead: plaintext enters rustls only once the previous
        // ciphertext is out (see flush), and what rustls makes is moved out at once.
        conn.set_buffer_limit(None);
        Ok(TlsConn { conn, cipher: Vec::new(), trusted: false })
    }

    /// Whether the handshake is still under way.
    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Whether there is ciphertext (a handshake message, an alert) waiting to be written.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write() || !self.cipher.is_empty()
    }

    /// Reads like `Read::read` on the socket, but plaintext: `Ok(0)` is the end of the
    /// stream (close_notify, or the socket's end), `WouldBlock` means nothing more now;
    /// any other error (plain text to the TLS port, a refused certificate, the end of
    /// the stream in the handshake) closes the connection.
    pub fn read(&mut self, sock: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: still its end.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match self.conn.read_tls(sock) {
                // Nothing was said yet, so there is nothing to drain: just close.
                Ok(0) if self.conn.is_handshaking() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "end of stream in the TLS handshake",
                    ));
                }
                // rustls notes the end; its reader reports it on the next round.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let was_handshaking = self.conn.is_handshaking();
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the client why (an alert), if its socket takes it now.
                while self.conn.wants_write() && self.conn.write_tls(sock).is_ok_and(|n| n > 0) {}
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
            }
            if was_handshaking && !self.conn.is_handshaking() {
                self.trusted = crate::tls::peer_trusted(&self.conn);
            }
        }
    }

    /// Writes the turn's plaintext, `plain` (taken from `out` or from the fan-out buffer),
    /// through rustls. Plaintext is encrypted only once the handshake is over and the
    /// previous ciphertext is out: until then it waits where it is, counted as unsent.
    /// Returns whether `plain` was taken; `held` is set to the ciphertext left over.
    pub fn flush(&mut self, sock: &mut TcpStream, plain: &[u8], held: &mut u32) -> io::Result<bool> {
        if !self.cipher.is_empty() {
            let n = write_some(sock, &self.cipher)?;
            if n == self.cipher.len() {
                self.cipher = Vec::new();
            } else {
                self.cipher.drain(..n);
            }
        }
        let take = self.cipher.is_empty() && !self.conn.is_handshaking() && !plain.is_empty();
        if take {
            // One write: rustls cuts records of up to 16 KiB from it, not one per line.
            self.conn.writer().write_all(plain)?;
        }
        if self.cipher.is_empty() {
            while self.conn.wants_write() {
                match self.conn.write_tls(sock) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // What the socket did not take leaves rustls, so that its size is known.
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.cipher)?;
        }
        *held = u32::try_from(self.cipher.len()).unwrap_or(u32::MAX);
        Ok(take)
    }

    /// Hands `out` to rustls (when the handshake allows) followed by close_notify: the
    /// goodbye of a stopping server. The next flush sends it.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) {
        // Nothing can be said inside TLS before the handshake is over: drop it.
        if self.conn.is_handshaking() || self.conn.writer().write_all(out).is_ok() {
            out.clear();
        }
        self.conn.send_close_notify();
    }
}

impl TlsSide {
    /// Makes a newly admitted connection, to be slab entry `key`, a TLS one and starts
    /// its handshake clock. `false`: rustls refused to start (it should not); the caller
    /// drops the socket.
    pub(super) fn start(&mut self, key: usize, c: &mut Conn) -> bool {
        let Some(config) = self.config.clone() else { return false };
        match TlsConn::new(config) {
            Ok(t) => {
                c.tls = Some(Box::new(t));
                self.handshakes.0.push_back((Instant::now() + HANDSHAKE_TIMEOUT, key, c.id));
                true
            }
            Err(e) => {
                log::warn!("{}: TLS: {e}", c.peer);
                false
            }
        }
    }
}

impl Reactor {
    /// Closes the connections whose handshake is not over after [`HANDSHAKE_TIMEOUT`].
    pub(super) fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&(deadline, key, id)) = self.tls.handshakes.0.front() {
            let Some(c) = self.clients.conns.get(key).filter(|c| c.id == id) else {
                self.tls.handshakes.0.pop_front();
                continue;
            };
            if !c.tls.as_ref().is_some_and(|t| t.handshaking()) {
                self.tls.handshakes.0.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.tls.handshakes.0.pop_front();
            log::debug!("{}: TLS handshake not finished in {HANDSHAKE_TIMEOUT:?}; closing", c.peer);
            self.clients.close(key);
        }
    }

    /// Sets the configuration new TLS connections start with, after a reload.
    pub(super) fn set_tls_config(&mut self, config: Arc<ServerConfig>) {
        if self.tls.listener.is_some() {
            self.tls.config = Some(config);
        }
    }
}

impl Conn {
    /// `Conn::flush` for a TLS connection: the fan-out range or `out`, whichever holds
    /// this turn's plaintext (never both: see `Conn::shared`), goes through rustls.
    pub(super) fn flush_tls(&mut self, fan: &[u8]) -> io::Result<()> {
        let Conn { tls, sock, out, shared, held, .. } = self;
        let Some(t) = tls.as_deref_mut() else { return Ok(()) };
        let (a, b) = (shared.0 as usize, shared.1 as usize);
        if a < b {
            *shared = (0, 0);
            if !t.flush(sock, &fan[a..b], held)? {
                // Copied only now: the fan-out buffer is reused next turn.
                out.extend_from_slice(&fan[a..b]);
            }
        } else if t.flush(sock, out, held)? {
            // Give the memory back: most connections are idle most of the time.
            *out = Vec::new();
        }
        Ok(())
    }

    /// [tls] Queues the rest of `out` and close_notify (a no-op for a plain connection);
    /// the next flush sends them.
    pub(super) fn close_notify(&mut self) {
        if let Some(t) = self.tls.as_deref_mut() {
            t.close_notify(&mut self.out);
        }
    }
}
