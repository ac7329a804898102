//! replay: MSGs/s of one connection's replay (`WATCH … SINCE 0`) of `--count` kept
//! notifications; `replay-fill` puts them in a stopped notifd's database first.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use super::fmt_result;
use crate::args::Args;
use crate::wire::Server;
use crate::Meter;

/// The event the notifications are kept under.
const EVENT: &str = "bench.replay";

/// Adds `--count` notifications of [`EVENT`] to the database `--db` of a notifd that
/// is stopped (and ran once, so its schema is there), with ids from the next one it
/// would reserve, and moves that past them, as a reservation would.
pub fn fill(a: &Args) -> Result<(), String> {
    use rusqlite::{params, Connection};
    let e = |e: rusqlite::Error| format!("sqlite {}: {e}", a.db.display());
    let mut db = Connection::open(&a.db).map_err(e)?;
    let tx = db.transaction().map_err(e)?;
    let first: i64 =
        tx.query_row("SELECT value FROM meta WHERE key = 'next_id'", [], |r| r.get(0)).map_err(e)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let text = "x".repeat(a.payload);
    {
        let mut st = tx
            .prepare("INSERT INTO notifications(id, event, text, created_at) VALUES (?1, ?2, ?3, ?4)")
            .map_err(e)?;
        for id in first..first + a.count as i64 {
            st.execute(params![id, EVENT, text, now]).map_err(e)?;
        }
    }
    tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_id'", [first + a.count as i64]).map_err(e)?;
    tx.commit().map_err(e)?;
    println!("{}", fmt_result(&[("scenario", "replay-fill".into()), ("rows", a.count.to_string())]));
    Ok(())
}

/// Replays everything kept to one connection and counts the `MSG` lines.
pub fn run(a: &Args) -> Result<(), String> {
    if a.server != Server::Notifd {
        return Err("replay is a notifd scenario".into());
    }
    let deadline = Instant::now() + a.timeout;
    let mut sock = TcpStream::connect_timeout(&a.addr, a.timeout).map_err(|e| format!("{}: {e}", a.addr))?;
    sock.set_read_timeout(Some(a.timeout)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut have, mut msgs, mut lines) = (0usize, 0u64, 0u64);
    let meter = Meter::start();
    sock.write_all(format!("WATCH {EVENT} SINCE 0\r\n").as_bytes()).map_err(|e| e.to_string())?;
    while msgs < a.count {
        if Instant::now() > deadline {
            return Err(format!("timeout after {msgs} of {} MSGs", a.count));
        }
        let n = sock.read(&mut buf[have..]).map_err(|e| format!("read after {msgs} MSGs: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {msgs} of {} MSGs", a.count));
        }
        have += n;
        let mut at = 0;
        while let Some(i) = buf[at..have].iter().position(|&b| b == b'\n') {
            let line = &buf[at..at + i];
            if line.starts_with(b"MSG ") {
                msgs += 1;
            } else if line.starts_with(b"-ERR") {
                return Err(format!("server: {}", String::from_utf8_lossy(line)));
            }
            lines += 1;
            at += i + 1;
        }
        buf.copy_within(at..have, 0);
        have -= at;
    }
    let (secs, cpu) = meter.stop();
    println!(
        "{}",
        fmt_result(&[
            ("scenario", "replay".into()),
            ("server", "notifd".into()),
            ("msgs", msgs.to_string()),
            ("lines", lines.to_string()),
            ("secs", format!("{secs:.3}")),
            ("msgs_per_s", format!("{:.0}", msgs as f64 / secs)),
            ("gen_cpu", format!("{cpu:.2}")),
        ])
    );
    Ok(())
}
