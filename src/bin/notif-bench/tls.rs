//! `--tls`: every connection of the run speaks through a rustls client (ring, as notifd),
//! sans-I/O under the same mio loop: ciphertext from the socket is decrypted into the
//! plaintext the codecs parse, and a connection's queued output is encrypted in one go
//! per flush. The server's certificate is checked against `--ca` for the name
//! `localhost`. NATS (2.9) sends its INFO line in clear before the handshake: the
//! connection turns to TLS after it.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// A client configuration trusting the PEM certificates of `ca`.
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        roots.add(cert).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connection's TLS session, before or after the point where it starts.
pub struct Session {
    conn: ClientConnection,
    /// Bytes go through TLS (false only for NATS until its INFO line).
    pub on: bool,
}

impl Session {
    pub fn new(config: &Arc<ClientConfig>, on: bool) -> Result<Session, String> {
        let name = ServerName::try_from("localhost").expect("a valid name");
        let mut conn = ClientConnection::new(config.clone(), name).map_err(|e| format!("TLS: {e}"))?;
        // The loop bounds what it queues; rustls need not refuse any of it.
        conn.set_buffer_limit(None);
        Ok(Session { conn, on })
    }

    /// Plaintext into `buf`: `Ok(0)` at the end, `WouldBlock` when the socket is empty.
    pub fn read(&mut self, sock: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                other => return other,
            }
            if self.conn.read_tls(sock)? == 0 {
                return Ok(0);
            }
            self.conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }

    /// Encrypts `plain` (sent once the handshake allows) and sends what the socket takes.
    pub fn write(&mut self, sock: &mut TcpStream, plain: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(plain)?;
        self.push(sock)
    }

    /// Sends queued ciphertext until the socket would block.
    pub fn push(&mut self, sock: &mut TcpStream) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }
}
