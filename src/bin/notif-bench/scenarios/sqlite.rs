//! sqlite: the baselines for durable, with no server.

use std::fs;
use std::time::Instant;

use super::fmt_result;
use crate::args::Args;
use crate::Meter;

/// The baselines for the durable scenario: SQLite on the same disk, no server, with
/// `synchronous = FULL` and WAL, inserting rows shaped like notifd's subscriptions.
pub fn run(a: &Args) -> Result<(), String> {
    use rusqlite::{params, Connection};
    let e = |e: rusqlite::Error| format!("sqlite {}: {e}", a.db.display());
    for suffix in ["", "-wal", "-shm"] {
        let mut p = a.db.clone().into_os_string();
        p.push(suffix);
        let _ = fs::remove_file(p);
    }
    let db = Connection::open(&a.db).map_err(e)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS subscriptions(email TEXT, event TEXT,
           created_at INTEGER, PRIMARY KEY (email, event));",
    )
    .map_err(e)?;
    let mut n = 0u64;
    for (mode, batch) in [("row", 1usize), ("batch64", 64), ("batch10000", 10_000)] {
        let meter = Meter::start();
        let stop_at = Instant::now() + a.duration;
        let mut rows = 0u64;
        while Instant::now() < stop_at && rows < 100_000_000 {
            let tx = db.unchecked_transaction().map_err(e)?;
            {
                let mut st = tx
                    .prepare_cached("INSERT OR IGNORE INTO subscriptions VALUES (?1, 'bench.sqlite', ?2)")
                    .map_err(e)?;
                for _ in 0..batch {
                    n += 1;
                    st.execute(params![format!("u{n}@bench.example"), 1_800_000_000i64]).map_err(e)?;
                }
            }
            tx.commit().map_err(e)?;
            rows += batch as u64;
        }
        let (secs, cpu) = meter.stop();
        println!(
            "{}",
            fmt_result(&[
                ("scenario", "sqlite".into()),
                ("mode", mode.into()),
                ("rows", rows.to_string()),
                ("secs", format!("{secs:.3}")),
                ("rows_per_s", format!("{:.0}", rows as f64 / secs)),
                ("gen_cpu", format!("{cpu:.2}")),
            ])
        );
    }
    drop(db);
    for suffix in ["", "-wal", "-shm"] {
        let mut p = a.db.clone().into_os_string();
        p.push(suffix);
        let _ = fs::remove_file(p);
    }
    Ok(())
}
