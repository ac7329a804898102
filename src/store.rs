//! The store process: the only process that opens the database.
//!
//! It reads [`ToStore`] records from its pipe, applies everything that arrived together
//! in one transaction with one fsync (group commit), and only then answers each record.
//! It owns the outbox, the durable queue of emails. It never talks to clients or mail
//! servers. On EOF from the reactor it finishes the batch in hand and exits.

use crate::consent;
use crate::ipc::{
    self, FromStore, MailJob, MailOutcome, MailPlan, MailResult, Refusal, StoreSettings, StoreStats, ToStore,
};
use rusqlite::{params, Connection, OptionalExtension};
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

mod pairs;

/// Schema version kept in `PRAGMA user_version` (2: consent; 3: replay's index and
/// `deleted_max`).
const SCHEMA_VERSION: i64 = 3;

/// Rows per `ListChunk`, so that a LIST answer never outgrows the frame maximum:
/// a row is at most 128 + 10 bytes.
const LIST_CHUNK: usize = 4096;

/// The `meta` keys of the email counters of STATS.
const EMAILS_SENT: &str = "emails_sent";
const EMAILS_FAILED: &str = "emails_failed";

/// How often old notifications and finished emails are deleted.
const CLEANUP_EVERY: Duration = Duration::from_secs(3600);

/// A database error, with what the store was doing.
#[derive(Debug)]
pub struct StoreError(String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

fn ctx(what: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError(format!("{what}: {e}"))
}

/// How long a starting store waits for the database's lock: a store being replaced
/// after a crash may take a moment to let go of it.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// The lock file beside the database: `notifd.db` → `notifd.db.lock`.
pub fn lock_path(db_path: &Path) -> std::path::PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".lock");
    name.into()
}

/// Takes the exclusive lock that makes a database one daemon's, waiting up to `wait`
/// for a holder to go away; held until the returned file is closed (the store's exit).
/// A lock file rather than the database itself: SQLite's own POSIX locks on the
/// database and flock(2) on it would be one lock on some file systems.
pub fn lock(db_path: &Path, wait: Duration) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(db_path);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| StoreError(format!("cannot open the lock file {}: {e}", path.display())))?;
    let deadline = Instant::now() + wait;
    loop {
        let e = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(locked) => {
                // For whoever finds the lock taken: which process holds it.
                let pid = format!("{}\n", std::process::id());
                let _ = locked.set_len(0).and_then(|()| (&*locked).write_all(pid.as_bytes()));
                return Ok(locked);
            }
            Err((back, errno)) => {
                file = back;
                io::Error::from(errno)
            }
        };
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(StoreError(format!("cannot lock {}: {e}", path.display())));
        }
        if Instant::now() >= deadline {
            let holder = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u32>().ok());
            return Err(StoreError(format!(
                "database {} is in use by another notifd ({} holds {}); one database, one daemon",
                db_path.display(),
                holder.map_or("a process".to_string(), |pid| format!("pid {pid}")),
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens (creating if missing) the database at `path` with notifd's schema.
pub fn open(path: &Path, settings: &StoreSettings) -> Result<Connection, StoreError> {
    let db = Connection::open(path).map_err(ctx(&format!("cannot open {}", path.display())))?;
    db.busy_timeout(Duration::from_millis(settings.busy_timeout_ms.into())).map_err(ctx("busy_timeout"))?;
    let mode: String =
        db.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(ctx("cannot set WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError(format!("{}: journal mode is {mode}, not wal", path.display())));
    }
    db.execute_batch("PRAGMA journal_size_limit=67108864; PRAGMA foreign_keys=OFF;")
        .map_err(ctx("pragmas"))?;
    set_sync(&db, settings.sync_full)?;
    migrate(&db)?;
    Ok(db)
}

fn set_sync(db: &Connection, full: bool) -> Result<(), StoreError> {
    db.execute_batch(if full { "PRAGMA synchronous=FULL" } else { "PRAGMA synchronous=NORMAL" })
        .map_err(ctx("synchronous"))
}

/// Creates the schema, or brings an older one forward, one numbered step at a time,
/// each in its own transaction: a fresh database goes through every step.
fn migrate(db: &Connection) -> Result<(), StoreError> {
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(ctx("user_version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "database schema {version} is newer than this notifd's {SCHEMA_VERSION}; refusing to touch it"
        )));
    }
    if version < 1 {
        db.execute_batch(SCHEMA_1).map_err(ctx("cannot create schema"))?;
    }
    if version < 2 {
        migrate_consent(db)?;
    }
    if version < 3 {
        migrate_3_replay(db)?;
    }
    Ok(())
}

/// Step 1: the first schema.
const SCHEMA_1: &str = "BEGIN;
     CREATE TABLE IF NOT EXISTS subscriptions(
         email TEXT, event TEXT, created_at INTEGER, PRIMARY KEY (email, event));
     CREATE INDEX IF NOT EXISTS subscriptions_by_event ON subscriptions(event, email);
     CREATE TABLE IF NOT EXISTS notifications(
         id INTEGER PRIMARY KEY, event TEXT NOT NULL, text TEXT NOT NULL, created_at INTEGER NOT NULL);
     CREATE TABLE IF NOT EXISTS outbox(
         notification_id INTEGER NOT NULL, email TEXT NOT NULL,
         state TEXT NOT NULL, tries INTEGER NOT NULL DEFAULT 0,
         next_try_at INTEGER NOT NULL, last_error TEXT, updated_at INTEGER NOT NULL,
         PRIMARY KEY (notification_id, email));
     CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_try_at);
     CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     INSERT OR IGNORE INTO meta(key, value) VALUES ('next_id', 1);
     PRAGMA user_version = 1;
     COMMIT;";

/// Step 2, consent: pending pairs (`confirmed_at` NULL; the rows of an older database
/// were all confirmed, so they are, as of when they were made); for each pair an
/// untrusted SUB made, who asked, when, and its sequence number (a confirmation code
/// covers an address's pairs up to one of them), beside the contract's subscriptions
/// table; the confirmation emails sent (also the state of their limits), the opted-out
/// mailboxes, and the server secret for codes and links.
fn migrate_consent(db: &Connection) -> Result<(), StoreError> {
    let secret = consent::Secret::generate()
        .map_err(|e| StoreError(format!("no random bytes for the secret: {e}")))?;
    let step = || -> Result<(), rusqlite::Error> {
        db.execute_batch(
            "ALTER TABLE subscriptions ADD COLUMN confirmed_at INTEGER;
             UPDATE subscriptions SET confirmed_at = created_at;
             CREATE INDEX subscriptions_pending ON subscriptions(email) WHERE confirmed_at IS NULL;
             CREATE INDEX subscriptions_pending_age ON subscriptions(created_at) WHERE confirmed_at IS NULL;
             CREATE TABLE asked(
                 email TEXT NOT NULL, event TEXT NOT NULL, seq INTEGER NOT NULL,
                 asked_by TEXT NOT NULL, asked_at INTEGER NOT NULL, PRIMARY KEY (email, event));
             CREATE INDEX asked_by_seq ON asked(email, seq);
             INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', 1);
             CREATE TABLE confirmations(
                 id INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT NOT NULL,
                 mailbox TEXT NOT NULL, domain TEXT NOT NULL, last_seq INTEGER NOT NULL,
                 sent_at INTEGER NOT NULL, answered_at INTEGER);
             CREATE INDEX confirmations_by_email ON confirmations(email);
             CREATE INDEX confirmations_by_mailbox ON confirmations(mailbox, sent_at);
             CREATE INDEX confirmations_by_domain ON confirmations(domain, sent_at);
             CREATE INDEX confirmations_by_time ON confirmations(sent_at);
             CREATE INDEX outbox_by_email ON outbox(email, state);
             CREATE TABLE optouts(mailbox TEXT PRIMARY KEY, at INTEGER NOT NULL);
             CREATE TABLE secrets(name TEXT PRIMARY KEY, value BLOB NOT NULL);",
        )?;
        db.execute(
            "INSERT INTO secrets(name, value) VALUES ('consent', ?1)",
            params![&secret.as_bytes()[..]],
        )?;
        db.execute_batch("PRAGMA user_version = 2")
    };
    db.execute_batch("BEGIN").map_err(ctx("begin the consent upgrade"))?;
    match step() {
        Ok(()) => db.execute_batch("COMMIT").map_err(ctx("commit the consent upgrade")),
        Err(e) => {
            let _ = db.execute_batch("ROLLBACK");
            Err(StoreError(format!("cannot upgrade the schema to version 2 (consent): {e}")))
        }
    }
}

/// The server secret kept in the database.
fn load_secret(db: &Connection) -> Result<consent::Secret, StoreError> {
    let bytes: Vec<u8> = db
        .query_row("SELECT value FROM secrets WHERE name = 'consent'", [], |r| r.get(0))
        .map_err(ctx("read the server secret"))?;
    consent::Secret::from_bytes(&bytes).ok_or_else(|| {
        StoreError(format!("the server secret is {} bytes, not {}", bytes.len(), consent::SECRET_LEN))
    })
}

/// Step 3, for replay: the (event, id) index that a replay part reads, and
/// `deleted_max`, the highest notification id cleanup ever deleted (for `GAP`). A
/// database of step 1 may have deleted some already; its highest is not known, so the
/// lowest id left minus one is the best guess that never hides a deletion.
fn migrate_3_replay(db: &Connection) -> Result<(), StoreError> {
    db.execute_batch(
        "BEGIN;
         CREATE INDEX IF NOT EXISTS notifications_by_event ON notifications(event, id);
         INSERT OR IGNORE INTO meta(key, value)
             SELECT 'deleted_max', COALESCE((SELECT min(id) - 1 FROM notifications), 0);
         PRAGMA user_version = 3;
         COMMIT;",
    )
    .map_err(ctx("cannot add the replay index (schema 3)"))
}

/// The delay before try number `tries + 1`: `base` doubled for each earlier retry, capped
/// at an hour, scaled by `jitter` (0.8 to 1.2) so that a burst does not retry in step.
pub fn retry_delay(base: u32, tries: u32, jitter: f64) -> i64 {
    let doubled = u64::from(base).saturating_mul(1u64 << tries.saturating_sub(1).min(20));
    let capped = doubled.min(3600) as f64;
    (capped * jitter.clamp(0.8, 1.2)).round().max(1.0) as i64
}

/// The store's state between batches.
pub struct Store {
    db: Connection,
    settings: StoreSettings,
    rng: u64,
    /// The key of every code and link token.
    secret: consent::Secret,
    /// Pending pairs in the database, when known (forgotten when a transaction fails).
    pending_total: Option<u64>,
    /// Pending pairs may wait for a confirmation email that a limit held back.
    confirmations_waiting: bool,
    /// When those were last looked for (Unix seconds).
    last_confirm_scan: i64,
    /// The `optouts` table may have rows. While it has none (the usual case), a trusted
    /// SUB has no opt-out to lift and spares that statement.
    optouts_maybe: bool,
}

impl Store {
    /// Wraps a database made or upgraded by [`open`].
    pub fn new(db: Connection, settings: StoreSettings) -> Result<Store, StoreError> {
        let secret = load_secret(&db)?;
        let optouts_maybe = db
            .query_row("SELECT EXISTS (SELECT 1 FROM optouts)", [], |r| r.get(0))
            .map_err(ctx("read the opt-outs"))?;
        Ok(Store {
            db,
            settings,
            rng: jitter_seed() | 1,
            secret,
            pending_total: None,
            // A store that starts does not know what its predecessor held back.
            confirmations_waiting: true,
            last_confirm_scan: i64::MIN,
            optouts_maybe,
        })
    }

    /// Makes emails left leased by a store that died available again. Run at start-up:
    /// whatever a mailer still holds is sent again at worst, which at-least-once allows.
    pub fn release_leases(&self) -> Result<(), StoreError> {
        self.db
            .execute("UPDATE outbox SET state = 'pending' WHERE state = 'sending'", [])
            .map(|_| ())
            .map_err(ctx("release leased emails"))
    }

    /// Applies one batch in one transaction and appends the answers to `out`.
    pub fn apply(&mut self, batch: &mut Vec<ToStore>, out: &mut Vec<u8>) {
        // Pragmas cannot change inside a transaction: settings go first.
        batch.retain(|r| match r {
            ToStore::Configure(settings) => {
                if let Err(e) = self.configure(settings) {
                    log::warn!("{e}");
                }
                false
            }
            ToStore::Logging(l) => {
                crate::logger::apply(l);
                false
            }
            _ => true,
        });
        if batch.is_empty() {
            return;
        }
        let needs_full =
            !self.settings.sync_full && batch.iter().any(|r| matches!(r, ToStore::ReserveIds { .. }));
        if needs_full {
            // An id block must survive power loss, or an id seen in a MSG could be reused.
            let _ = set_sync(&self.db, true);
        }
        let mut answers = Vec::with_capacity(batch.len());
        let result = self.transaction(batch, &mut answers);
        if needs_full {
            let _ = set_sync(&self.db, false);
        }
        match result {
            Ok(()) => {
                for a in &answers {
                    ipc::encode(a, out);
                }
            }
            Err(e) => {
                log::warn!("batch of {} requests failed: {e}", batch.len());
                self.pending_total = None;
                for r in batch.iter_mut() {
                    if let Some(&mut req) = r.req_mut() {
                        ipc::encode(&FromStore::Failed { req, reason: e.to_string() }, out);
                    }
                }
            }
        }
        batch.clear();
    }

    fn transaction(&mut self, batch: &[ToStore], answers: &mut Vec<FromStore>) -> Result<(), StoreError> {
        self.db.execute_batch("BEGIN IMMEDIATE").map_err(ctx("begin"))?;
        let mut result = Ok(());
        for r in batch {
            if let Err(e) = self.dispatch(r, answers) {
                result = Err(e);
                break;
            }
        }
        match result {
            Ok(()) => self.db.execute_batch("COMMIT").map_err(ctx("commit")).inspect_err(|_| {
                let _ = self.db.execute_batch("ROLLBACK");
            }),
            Err(e) => {
                let _ = self.db.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn dispatch(&mut self, r: &ToStore, answers: &mut Vec<FromStore>) -> Result<(), StoreError> {
        match r {
            ToStore::Hello { .. } => Ok(()),
            ToStore::Subscribe { req, email, event, now, trusted: true, .. } => {
                self.subscribe(email, event, *now)?;
                answers.push(FromStore::Done { req: *req });
                Ok(())
            }
            ToStore::Subscribe { req, email, event, now, trusted: false, client } => {
                let refused = self.subscribe_pending(email, event, *now, client)?;
                answers.push(done_or_refused(*req, refused));
                Ok(())
            }
            ToStore::Unsubscribe { req, email, event, trusted, code } => {
                let refused = self.unsubscribe(email, event, *trusted, code.as_deref())?;
                answers.push(done_or_refused(*req, refused));
                Ok(())
            }
            ToStore::Publish { req, id, event, text, now, mail } => {
                self.publish(*id, event, text, *now, mail)?;
                answers.push(FromStore::Done { req: *req });
                Ok(())
            }
            ToStore::List { req, email } => self.list(*req, email, answers),
            ToStore::ReserveIds { req, count } => {
                let (start, end) = self.reserve_ids(*count)?;
                answers.push(FromStore::Ids { req: *req, start, end });
                Ok(())
            }
            ToStore::TakeMail { req, max, now } => {
                let (jobs, next_due) = self.take_mail(*max, *now)?;
                answers.push(FromStore::Mail { req: *req, jobs, next_due });
                Ok(())
            }
            ToStore::MailDone { req, results, now } => {
                self.mail_done(results, *now)?;
                answers.push(FromStore::Done { req: *req });
                Ok(())
            }
            ToStore::Replay { req, event, after, max_rows, max_bytes } => {
                let answer = self.replay(*req, event, *after, *max_rows, *max_bytes)?;
                answers.push(answer);
                Ok(())
            }
            // Taken out of the batch by `apply`.
            ToStore::Configure(_) | ToStore::Logging(_) => Ok(()),
            ToStore::Stats { req } => {
                answers.push(FromStore::Stats { req: *req, stats: self.stats()? });
                Ok(())
            }
            ToStore::ListPairs { req, email } => self.list_pairs(*req, email, answers),
            ToStore::Confirm { req, email, code, now } => {
                answers.push(match self.confirm(email, code, *now)? {
                    Ok(count) => FromStore::Confirmed { req: *req, count },
                    Err(why) => FromStore::Refused { req: *req, why },
                });
                Ok(())
            }
            ToStore::OptOut { req, email, code, now } => {
                let refused = self.opt_out_with_code(email, code, *now)?;
                answers.push(done_or_refused(*req, refused));
                Ok(())
            }
            ToStore::OpenLink { req, token, action, now } => {
                let page = self.open_link(token, *action, *now)?;
                answers.push(FromStore::LinkPage { req: *req, page });
                Ok(())
            }
        }
    }

    fn configure(&mut self, settings: &StoreSettings) -> Result<(), StoreError> {
        set_sync(&self.db, settings.sync_full)?;
        self.db
            .busy_timeout(Duration::from_millis(settings.busy_timeout_ms.into()))
            .map_err(ctx("busy_timeout"))?;
        self.settings = settings.clone();
        Ok(())
    }

    fn publish(&self, id: u64, event: &str, text: &str, now: i64, mail: &MailPlan) -> Result<(), StoreError> {
        let mut st = self
            .db
            .prepare_cached(
                "INSERT INTO notifications(id, event, text, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
            )
            .map_err(ctx("publish"))?;
        let new = st.execute(params![id as i64, event, text, now]).map_err(ctx("publish"))? == 1;
        // A replayed publication is already queued (or its emails already went out).
        if !new || *mail == MailPlan::Nobody {
            return Ok(());
        }
        let mut queue = self
            .db
            .prepare_cached(
                "INSERT INTO outbox(notification_id, email, state, tries, next_try_at, updated_at)
                 SELECT ?1, email, 'pending', 0, ?2, ?2 FROM subscriptions
                 WHERE event = ?3 AND confirmed_at IS NOT NULL
                 ON CONFLICT DO NOTHING",
            )
            .map_err(ctx("queue emails"))?;
        queue.execute(params![id as i64, now, event]).map_err(ctx("queue emails"))?;
        if let MailPlan::AllExcept(live) = mail {
            let mut skip = self
                .db
                .prepare_cached("DELETE FROM outbox WHERE notification_id = ?1 AND email = ?2")
                .map_err(ctx("skip live addresses"))?;
            for email in live {
                skip.execute(params![id as i64, email]).map_err(ctx("skip live addresses"))?;
            }
        }
        Ok(())
    }

    fn list(&self, req: u64, email: &str, answers: &mut Vec<FromStore>) -> Result<(), StoreError> {
        let mut st = self
            .db
            .prepare_cached("SELECT event, created_at FROM subscriptions WHERE email = ?1 ORDER BY event")
            .map_err(ctx("list"))?;
        let mut rows = st.query(params![email]).map_err(ctx("list"))?;
        let mut chunk = Vec::new();
        while let Some(row) = rows.next().map_err(ctx("list"))? {
            chunk.push((row.get(0).map_err(ctx("list"))?, row.get(1).map_err(ctx("list"))?));
            if chunk.len() == LIST_CHUNK {
                answers.push(FromStore::ListChunk { req, rows: std::mem::take(&mut chunk), last: false });
            }
        }
        answers.push(FromStore::ListChunk { req, rows: chunk, last: true });
        Ok(())
    }

    /// One part of a replay. Read inside the batch's transaction, so every publication
    /// that came down the pipe before this request is in it.
    fn replay(
        &self,
        req: u64,
        event: &str,
        after: u64,
        max_rows: u32,
        max_bytes: u32,
    ) -> Result<FromStore, StoreError> {
        let after = after.min(i64::MAX as u64) as i64;
        let mut st = self
            .db
            .prepare_cached(
                "SELECT id, text FROM notifications WHERE event = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )
            .map_err(ctx("replay"))?;
        // One row more than asked tells whether there is more.
        let mut q = st.query(params![event, after, i64::from(max_rows.max(1)) + 1]).map_err(ctx("replay"))?;
        let mut rows: Vec<(u64, String)> = Vec::new();
        let (mut bytes, mut more) = (0usize, false);
        while let Some(row) = q.next().map_err(ctx("replay"))? {
            if rows.len() >= max_rows.max(1) as usize || bytes >= max_bytes as usize {
                more = true;
                break;
            }
            let id: i64 = row.get(0).map_err(ctx("replay"))?;
            let text: String = row.get(1).map_err(ctx("replay"))?;
            bytes += text.len() + event.len() + 24;
            rows.push((id as u64, text));
        }
        drop(q);
        let deleted = self.deleted_max()?;
        Ok(FromStore::Replayed { req, rows, deleted, more })
    }

    /// The highest notification id cleanup ever deleted; 0 for none.
    fn deleted_max(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .db
            .prepare_cached("SELECT value FROM meta WHERE key = 'deleted_max'")
            .map_err(ctx("deleted_max"))?
            .query_row([], |r| r.get(0))
            .optional()
            .map_err(ctx("deleted_max"))?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    fn reserve_ids(&self, count: u64) -> Result<(u64, u64), StoreError> {
        let next: i64 = self
            .db
            .query_row("SELECT value FROM meta WHERE key = 'next_id'", [], |r| r.get(0))
            .map_err(ctx("reserve ids"))?;
        let start = next.max(1) as u64;
        let end = start + count;
        self.db
            .execute("UPDATE meta SET value = ?1 WHERE key = 'next_id'", params![end as i64])
            .map_err(ctx("reserve ids"))?;
        Ok((start, end))
    }

    fn take_mail(&mut self, max: u32, now: i64) -> Result<(Vec<MailJob>, Option<i64>), StoreError> {
        let rescan = self.queue_waiting_confirmations(now)?;
        let mut jobs = Vec::new();
        if max > 0 {
            type Row = (i64, String, Option<String>, Option<String>, Option<i64>, u32);
            let rows: Vec<Row> = self
                .db
                .prepare_cached(
                    "SELECT o.notification_id, o.email, n.event, n.text, n.created_at, o.tries
                     FROM outbox o LEFT JOIN notifications n ON n.id = o.notification_id
                     WHERE o.state = 'pending' AND o.next_try_at <= ?1
                     ORDER BY o.next_try_at, o.notification_id LIMIT ?2",
                )
                .map_err(ctx("take mail"))?
                .query_map(params![now, max], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })
                .map_err(ctx("take mail"))?
                .collect::<Result<_, _>>()
                .map_err(ctx("take mail"))?;
            // The answer must fit in one frame: stop at BATCH_BYTES; the rest is taken next.
            let mut size = 0;
            let mut nothing_to_send = Vec::new();
            for (id, email, event, text, created_at, tries) in rows {
                let id = id as u64;
                let job = if id & ipc::CONFIRMATION_IDS != 0 {
                    self.confirmation_job(id & !ipc::CONFIRMATION_IDS, &email, tries)?
                } else if let (Some(event), Some(text), Some(created_at)) = (event, text, created_at) {
                    let kind = self.notification_kind(&email, &event);
                    Some(MailJob { id, email: email.clone(), event, text, created_at, tries, kind })
                } else {
                    None
                };
                let Some(job) = job else {
                    nothing_to_send.push((id, email));
                    continue;
                };
                size += job.size();
                jobs.push(job);
                if size >= ipc::BATCH_BYTES {
                    break;
                }
            }
            let mut lease = self
                .db
                .prepare_cached(
                    "UPDATE outbox SET state = 'sending' WHERE notification_id = ?1 AND email = ?2",
                )
                .map_err(ctx("lease mail"))?;
            for j in &jobs {
                lease.execute(params![j.id as i64, j.email]).map_err(ctx("lease mail"))?;
            }
            // A confirmation whose pairs were all answered or removed since it was queued.
            let mut forget = self
                .db
                .prepare_cached("DELETE FROM outbox WHERE notification_id = ?1 AND email = ?2")
                .map_err(ctx("drop mail"))?;
            for (id, email) in &nothing_to_send {
                forget.execute(params![*id as i64, email]).map_err(ctx("drop mail"))?;
            }
        }
        let next_due: Option<i64> = self
            .db
            .query_row("SELECT min(next_try_at) FROM outbox WHERE state = 'pending'", [], |r| r.get(0))
            .optional()
            .map_err(ctx("next due email"))?
            .flatten();
        // Pairs waiting on a limit: the reactor asks again when the store looks again.
        let next_due = match (next_due, rescan) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok((jobs, next_due))
    }

    fn mail_done(&mut self, results: &[MailResult], now: i64) -> Result<(), StoreError> {
        let (mut sent, mut failed) = (0i64, 0i64);
        for r in results {
            let tries: Option<u32> = self
                .db
                .prepare_cached("SELECT tries FROM outbox WHERE notification_id = ?1 AND email = ?2")
                .map_err(ctx("mail result"))?
                .query_row(params![r.id as i64, r.email], |row| row.get(0))
                .optional()
                .map_err(ctx("mail result"))?;
            let Some(tries) = tries else { continue };
            let tries = tries + 1;
            let (state, next, error) = match &r.outcome {
                MailOutcome::Sent => {
                    sent += 1;
                    ("sent", now, None)
                }
                MailOutcome::Retry(why) if tries < self.settings.mail_max_tries => {
                    let delay = retry_delay(self.settings.mail_retry_base, tries, self.jitter());
                    log::info!(
                        "{} to {}: try {tries} failed, next in {delay} s: {why}",
                        mail_name(r.id),
                        r.email
                    );
                    ("pending", now + delay, Some(why.as_str()))
                }
                MailOutcome::Retry(why) | MailOutcome::Fail(why) => {
                    log::warn!("{} to {}: given up after {tries} tries: {why}", mail_name(r.id), r.email);
                    failed += 1;
                    ("failed", now, Some(why.as_str()))
                }
            };
            self.db
                .prepare_cached(
                    "UPDATE outbox SET state = ?3, tries = ?4, next_try_at = ?5, last_error = ?6, updated_at = ?7
                     WHERE notification_id = ?1 AND email = ?2",
                )
                .map_err(ctx("mail result"))?
                .execute(params![r.id as i64, r.email, state, tries, next, error, now])
                .map_err(ctx("mail result"))?;
        }
        // Kept in `meta` rather than counted from the outbox, which cleanup empties:
        // a counter must never go down.
        for (key, n) in [(EMAILS_SENT, sent), (EMAILS_FAILED, failed)] {
            if n > 0 {
                self.db
                    .prepare_cached(
                        "INSERT INTO meta(key, value) VALUES (?1, ?2)
                         ON CONFLICT(key) DO UPDATE SET value = value + ?2",
                    )
                    .map_err(ctx("count emails"))?
                    .execute(params![key, n])
                    .map_err(ctx("count emails"))?;
            }
        }
        Ok(())
    }

    /// The counts of STATS and `/metrics` that the database holds.
    fn stats(&self) -> Result<StoreStats, StoreError> {
        let count = |sql: &str| -> Result<u64, StoreError> {
            let n: i64 = self.db.query_row(sql, [], |r| r.get(0)).map_err(ctx("stats"))?;
            Ok(n.max(0) as u64)
        };
        let meta = |key: &str| -> Result<u64, StoreError> {
            let n: Option<i64> = self
                .db
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(ctx("stats"))?;
            Ok(n.unwrap_or(0).max(0) as u64)
        };
        Ok(StoreStats {
            stored_subscriptions: count("SELECT count(*) FROM subscriptions")?,
            pending_subscriptions: count("SELECT count(*) FROM subscriptions WHERE confirmed_at IS NULL")?,
            outbox_pending: count("SELECT count(*) FROM outbox WHERE state IN ('pending', 'sending')")?,
            emails_sent_total: meta(EMAILS_SENT)?,
            emails_failed_total: meta(EMAILS_FAILED)?,
        })
    }

    /// 0.8 to 1.2, from a xorshift: retries need spreading, not cryptography.
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        0.8 + (self.rng % 4001) as f64 / 10_000.0
    }

    /// Deletes notifications and finished emails older than `keep_days`; pending emails
    /// stay. The highest notification id deleted is kept (`deleted_max`), for `GAP`.
    pub fn cleanup(&self, now: i64) -> Result<(), StoreError> {
        if self.settings.keep_days == 0 {
            return Ok(());
        }
        let cutoff = now - i64::from(self.settings.keep_days) * 86_400;
        self.db
            .execute_batch(&format!(
                "BEGIN;
                 DELETE FROM outbox WHERE state IN ('sent', 'failed') AND updated_at < {cutoff};
                 INSERT INTO meta(key, value)
                   SELECT 'deleted_max', max(id) FROM notifications WHERE created_at < {cutoff}
                     AND id NOT IN (SELECT notification_id FROM outbox) HAVING max(id) IS NOT NULL
                   ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value);
                 DELETE FROM notifications WHERE created_at < {cutoff}
                   AND id NOT IN (SELECT notification_id FROM outbox);
                 COMMIT;"
            ))
            .map_err(ctx("cleanup"))
    }
}

/// An email as the log names it: `email 42` for notification 42, `confirmation 7`.
fn mail_name(id: u64) -> String {
    if id & ipc::CONFIRMATION_IDS != 0 {
        format!("confirmation {}", id & !ipc::CONFIRMATION_IDS)
    } else {
        format!("email {id}")
    }
}

/// `Done`, or `Refused` when the request was refused.
fn done_or_refused(req: u64, refused: Option<Refusal>) -> FromStore {
    match refused {
        None => FromStore::Done { req },
        Some(why) => FromStore::Refused { req, why },
    }
}

/// A seed for the retry jitter that differs between stores and between restarts: the
/// clock's nanoseconds with the pid in the high bits.
fn jitter_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// The store process's main loop. Returns the exit status.
pub fn run(db_path: &Path, settings: StoreSettings, input: OwnedFd, output: OwnedFd) -> i32 {
    // Non-blocking in, so a batch is "whatever is there"; blocking out, since the store
    // has nothing better to do than wait for the reactor to take its answers.
    crate::spawn::set_blocking(&input, false);
    crate::spawn::set_blocking(&output, true);
    let _lock = match lock(db_path, LOCK_WAIT) {
        Ok(file) => file,
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    let db = match open(db_path, &settings) {
        Ok(db) => db,
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    let mut store = match Store::new(db, settings) {
        Ok(store) => store,
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    if let Err(e) = store.release_leases() {
        log::error!("{e}");
        return 1;
    }
    let mut input = std::fs::File::from(input);
    let mut output = std::fs::File::from(output);
    let mut out = Vec::with_capacity(64 * 1024);
    ipc::encode(&FromStore::Hello { version: ipc::VERSION }, &mut out);
    if output.write_all(&out).is_err() {
        return 1;
    }
    let _ = store.cleanup(ipc::unix_now());
    let _ = store.expire_pending(ipc::unix_now());
    let mut last_cleanup = Instant::now();
    let mut reader = ipc::FrameReader::default();
    let mut batch = Vec::new();
    let mut greeted = false;
    loop {
        // Block until the reactor sends something (or an hour passes, for cleanup), then
        // take everything that is there without blocking again: that is one batch.
        let timeout = CLEANUP_EVERY.saturating_sub(last_cleanup.elapsed());
        let eof = match wait_readable(&input, timeout) {
            Ok(false) => false,
            // A bound on one batch, so a flood cannot delay every answer indefinitely.
            Ok(true) => match reader.fill_from(&mut input, 1 << 20) {
                Ok(filled) => filled == ipc::Filled::Eof,
                Err(e) => {
                    log::error!("reading from reactor: {e}");
                    return 1;
                }
            },
            Err(e) => {
                log::error!("waiting for reactor: {e}");
                return 1;
            }
        };
        loop {
            match reader.next_frame::<ToStore>() {
                Ok(Some(ToStore::Hello { version })) => {
                    if version != ipc::VERSION {
                        log::error!("reactor speaks record version {version}, this store {}", ipc::VERSION);
                        return 1;
                    }
                    greeted = true;
                }
                Ok(Some(r)) if greeted => batch.push(r),
                Ok(Some(_)) => {
                    log::error!("reactor sent a record before its hello");
                    return 1;
                }
                Ok(None) => break,
                Err(e) => {
                    log::error!("reactor: {e}");
                    return 1;
                }
            }
        }
        if !batch.is_empty() {
            out.clear();
            store.apply(&mut batch, &mut out);
            if let Err(e) = output.write_all(&out) {
                // The reactor is gone: what was committed stays committed.
                log::debug!("answering reactor: {e}");
                return 0;
            }
        }
        if eof {
            log::debug!("reactor closed the pipe; exiting");
            return 0;
        }
        if last_cleanup.elapsed() >= CLEANUP_EVERY {
            if let Err(e) = store.cleanup(ipc::unix_now()) {
                log::warn!("{e}");
            }
            if let Err(e) = store.expire_pending(ipc::unix_now()) {
                log::warn!("{e}");
            }
            last_cleanup = Instant::now();
        }
    }
}

fn wait_readable(fd: &impl AsFd, timeout: Duration) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn settings() -> StoreSettings {
        StoreSettings {
            sync_full: true,
            keep_days: 30,
            mail_retry_base: 30,
            mail_max_tries: 3,
            busy_timeout_ms: 1000,
            confirm_mail: true,
            consent: ipc::ConsentLimits::default(),
        }
    }

    pub(super) fn answers(store: &mut Store, batch: Vec<ToStore>) -> Vec<FromStore> {
        let mut batch = batch;
        let mut out = Vec::new();
        store.apply(&mut batch, &mut out);
        let mut got = Vec::new();
        let mut at = 0;
        while let Some((m, used)) = ipc::decode::<FromStore>(&out[at..]).unwrap() {
            got.push(m);
            at += used;
        }
        got
    }

    #[test]
    fn retry_delays_double_up_to_an_hour() {
        assert_eq!(retry_delay(30, 1, 1.0), 30);
        assert_eq!(retry_delay(30, 2, 1.0), 60);
        assert_eq!(retry_delay(30, 3, 1.0), 120);
        assert_eq!(retry_delay(30, 30, 1.0), 3600);
        assert_eq!(retry_delay(30, 1, 0.8), 24);
        assert_eq!(retry_delay(30, 1, 5.0), 36);
    }

    #[test]
    fn the_jitter_seed_is_more_than_the_pid() {
        // It was the pid plus Instant::now().elapsed(), about zero nanoseconds.
        let pid = u64::from(std::process::id());
        let seed = jitter_seed();
        assert_ne!(seed, pid);
        // The clock's part: nanoseconds since 1970 are far from zero.
        assert!(seed ^ (pid << 32) > 1 << 60);
    }

    #[test]
    fn subscribe_publish_queue_and_mail_results() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.db"), &settings()).unwrap();
        let mut s = Store::new(db, settings()).unwrap();
        let sub = |req, email: &str, event: &str| ToStore::Subscribe {
            req,
            email: email.into(),
            event: event.into(),
            now: 100 + req as i64,
            trusted: true,
            client: String::new(),
        };
        let got = answers(
            &mut s,
            vec![
                ToStore::ReserveIds { req: 1, count: 1000 },
                sub(2, "a@x", "e"),
                sub(3, "b@x", "e"),
                sub(4, "c@x", "other"),
                sub(5, "a@x", "e"),
                ToStore::List { req: 6, email: "a@x".into() },
            ],
        );
        assert_eq!(got[0], FromStore::Ids { req: 1, start: 1, end: 1001 });
        assert_eq!(got[4], FromStore::Done { req: 5 });
        // The first timestamp stays.
        assert_eq!(got[5], FromStore::ListChunk { req: 6, rows: vec![("e".into(), 102)], last: true });
        let got = answers(
            &mut s,
            vec![
                ToStore::ReserveIds { req: 7, count: 10 },
                ToStore::Publish {
                    req: 8,
                    id: 5,
                    event: "e".into(),
                    text: "hi".into(),
                    now: 200,
                    mail: MailPlan::AllExcept(vec!["b@x".into()]),
                },
                // A replay changes nothing.
                ToStore::Publish {
                    req: 9,
                    id: 5,
                    event: "e".into(),
                    text: "hi".into(),
                    now: 201,
                    mail: MailPlan::All,
                },
                ToStore::TakeMail { req: 10, max: 10, now: 200 },
                ToStore::TakeMail { req: 11, max: 10, now: 200 },
            ],
        );
        assert_eq!(got[0], FromStore::Ids { req: 7, start: 1001, end: 1011 });
        let FromStore::Mail { jobs, next_due: None, .. } = &got[3] else { panic!("{:?}", got[3]) };
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].id, jobs[0].email.as_str(), jobs[0].text.as_str()), (5, "a@x", "hi"));
        // Leased: not handed out twice.
        assert_eq!(got[4], FromStore::Mail { req: 11, jobs: vec![], next_due: None });
        let retry =
            vec![MailResult { id: 5, email: "a@x".into(), outcome: MailOutcome::Retry("421".into()) }];
        answers(&mut s, vec![ToStore::MailDone { req: 12, results: retry.clone(), now: 300 }]);
        let got = answers(&mut s, vec![ToStore::TakeMail { req: 13, max: 10, now: 300 }]);
        let FromStore::Mail { jobs, next_due: Some(due), .. } = &got[0] else { panic!("{:?}", got[0]) };
        assert!(jobs.is_empty() && (324..=336).contains(due), "{due}");
        let got = answers(&mut s, vec![ToStore::TakeMail { req: 14, max: 10, now: 400 }]);
        let FromStore::Mail { jobs, .. } = &got[0] else { panic!() };
        assert_eq!(jobs[0].tries, 1);
        // Third try fails for good (mail_max_tries = 3); the row stays with its error.
        answers(&mut s, vec![ToStore::MailDone { req: 15, results: retry.clone(), now: 400 }]);
        answers(&mut s, vec![ToStore::TakeMail { req: 16, max: 10, now: 10_000 }]);
        answers(&mut s, vec![ToStore::MailDone { req: 17, results: retry, now: 10_000 }]);
        let (state, tries, err): (String, u32, String) =
            s.db.query_row("SELECT state, tries, last_error FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((state.as_str(), tries, err.as_str()), ("failed", 3, "421"));
    }

    #[test]
    fn leases_are_released_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut s = Store::new(open(&path, &settings()).unwrap(), settings()).unwrap();
        answers(
            &mut s,
            vec![
                ToStore::Subscribe {
                    req: 1,
                    email: "a@x".into(),
                    event: "e".into(),
                    now: 1,
                    trusted: true,
                    client: String::new(),
                },
                ToStore::Publish {
                    req: 2,
                    id: 1,
                    event: "e".into(),
                    text: "t".into(),
                    now: 1,
                    mail: MailPlan::All,
                },
                ToStore::TakeMail { req: 3, max: 5, now: 1 },
            ],
        );
        drop(s);
        let s = Store::new(open(&path, &settings()).unwrap(), settings()).unwrap();
        s.release_leases().unwrap();
        let mut s = s;
        let got = answers(&mut s, vec![ToStore::TakeMail { req: 4, max: 5, now: 1 }]);
        let FromStore::Mail { jobs, .. } = &got[0] else { panic!() };
        assert_eq!(jobs.len(), 1);
    }

    #[test]
    fn replay_parts_follow_ids_and_cleanup_keeps_the_highest_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new(open(&dir.path().join("t.db"), &settings()).unwrap(), settings()).unwrap();
        let publish = |id: u64, event: &str, now| ToStore::Publish {
            req: id,
            id,
            event: event.into(),
            text: format!("t{id}"),
            now,
            mail: MailPlan::Nobody,
        };
        let day = 86_400;
        let batch: Vec<ToStore> = (1..=10)
            .map(|id| publish(id, if id % 2 == 0 { "e" } else { "o" }, 100 * day + id as i64))
            .collect();
        answers(&mut s, batch);
        let replay = |after, max_rows, max_bytes| ToStore::Replay {
            req: 50,
            event: "e".into(),
            after,
            max_rows,
            max_bytes,
        };
        let got = answers(
            &mut s,
            vec![replay(0, 2, 1000), replay(4, 10, 1000), replay(0, 10, 1), replay(10, 5, 5)],
        );
        let rows = |v: &[u64]| v.iter().map(|&i| (i, format!("t{i}"))).collect::<Vec<_>>();
        assert_eq!(got[0], FromStore::Replayed { req: 50, rows: rows(&[2, 4]), deleted: 0, more: true });
        assert_eq!(got[1], FromStore::Replayed { req: 50, rows: rows(&[6, 8, 10]), deleted: 0, more: false });
        // At least one row, even past max_bytes.
        assert_eq!(got[2], FromStore::Replayed { req: 50, rows: rows(&[2]), deleted: 0, more: true });
        assert_eq!(got[3], FromStore::Replayed { req: 50, rows: vec![], deleted: 0, more: false });
        // Cleanup at day 130 + 5 s with keep_days 30 deletes ids 1 to 4.
        s.cleanup(130 * day + 5).unwrap();
        let got = answers(&mut s, vec![replay(0, 10, 1000)]);
        assert_eq!(got[0], FromStore::Replayed { req: 50, rows: rows(&[6, 8, 10]), deleted: 4, more: false });
        // Nothing old enough: the highest stays.
        s.cleanup(130 * day + 5).unwrap();
        s.cleanup(0).unwrap();
        assert_eq!(s.deleted_max().unwrap(), 4);
        drop(s);
        // A reopened database keeps it; schema 3 is there.
        let db = open(&dir.path().join("t.db"), &settings()).unwrap();
        let v: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert_eq!(Store::new(db, settings()).unwrap().deleted_max().unwrap(), 4);
    }

    #[test]
    fn a_schema_1_database_is_migrated_to_the_replay_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE subscriptions(email TEXT, event TEXT, created_at INTEGER, PRIMARY KEY (email, event));
                 CREATE TABLE notifications(id INTEGER PRIMARY KEY, event TEXT NOT NULL, text TEXT NOT NULL,
                     created_at INTEGER NOT NULL);
                 CREATE TABLE outbox(notification_id INTEGER NOT NULL, email TEXT NOT NULL, state TEXT NOT NULL,
                     tries INTEGER NOT NULL DEFAULT 0, next_try_at INTEGER NOT NULL, last_error TEXT,
                     updated_at INTEGER NOT NULL, PRIMARY KEY (notification_id, email));
                 CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('next_id', 20001);
                 INSERT INTO notifications VALUES (17, 'e', 'kept', 5);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let db = open(&path, &settings()).unwrap();
        let index: i64 = db
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'notifications_by_event'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(index, 1);
        // Ids below the oldest kept one may have been deleted.
        assert_eq!(Store::new(db, settings()).unwrap().deleted_max().unwrap(), 16);
    }

    #[test]
    fn list_is_chunked_in_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new(open(&dir.path().join("t.db"), &settings()).unwrap(), settings()).unwrap();
        // Events whose byte order differs from their insertion order, from a
        // case-insensitive order and from their timestamps' order: punctuation, digits,
        // upper and lower case ("B" < "_" < "a" in bytes).
        let words = ["b", "B", "a", "A", "_x", "9", "-", ".", ":", "a.b", "a-b", "a_b", "aB", "ab", "Z9"];
        let mut events: Vec<String> =
            (0..LIST_CHUNK + 5).map(|i| format!("{}{i}", words[i % words.len()])).collect();
        // A fixed shuffle (multiplying by a number prime to the length).
        let n = events.len();
        let batch: Vec<ToStore> = (0..n)
            .map(|k| ToStore::Subscribe {
                req: k as u64,
                email: "a@x".into(),
                event: events[k * 7919 % n].clone(),
                now: (n - k) as i64,
                trusted: true,
                client: String::new(),
            })
            .collect();
        answers(&mut s, batch);
        let got = answers(&mut s, vec![ToStore::List { req: 99, email: "a@x".into() }]);
        assert_eq!(got.len(), 2);
        let FromStore::ListChunk { rows: first, last: false, .. } = &got[0] else { panic!() };
        assert_eq!(first.len(), LIST_CHUNK);
        let FromStore::ListChunk { rows: rest, last: true, .. } = &got[1] else { panic!() };
        assert_eq!(rest.len(), 5);
        let listed: Vec<&str> = first.iter().chain(rest).map(|(e, _)| e.as_str()).collect();
        events.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(listed.len(), events.len());
        if let Some(i) = (0..listed.len()).find(|&i| listed[i] != events[i]) {
            let (end_l, end_e) = ((i + 3).min(listed.len()), (i + 3).min(events.len()));
            panic!("not in byte order at row {i}: {:?}, wanted {:?}", &listed[i..end_l], &events[i..end_e]);
        }
    }

    #[test]
    fn stats_count_rows_and_email_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new(open(&dir.path().join("t.db"), &settings()).unwrap(), settings()).unwrap();
        let stats = |s: &mut Store| {
            let got = answers(s, vec![ToStore::Stats { req: 1 }]);
            let [FromStore::Stats { req: 1, stats }] = got[..] else { panic!("{got:?}") };
            stats
        };
        assert_eq!(stats(&mut s), StoreStats::default());
        let mut batch: Vec<ToStore> = ["a@x", "b@x", "c@x"]
            .iter()
            .map(|m| ToStore::Subscribe {
                req: 2,
                email: (*m).into(),
                event: "e".into(),
                now: 1,
                trusted: true,
                client: String::new(),
            })
            .collect();
        batch.push(ToStore::Publish {
            req: 3,
            id: 1,
            event: "e".into(),
            text: "t".into(),
            now: 1,
            mail: MailPlan::All,
        });
        batch.push(ToStore::TakeMail { req: 4, max: 10, now: 1 });
        answers(&mut s, batch);
        let want = StoreStats { stored_subscriptions: 3, outbox_pending: 3, ..StoreStats::default() };
        assert_eq!(stats(&mut s), want);
        let result = |email: &str, outcome| MailResult { id: 1, email: email.into(), outcome };
        let results = vec![
            result("a@x", MailOutcome::Sent),
            result("b@x", MailOutcome::Fail("550".into())),
            result("c@x", MailOutcome::Retry("421".into())),
        ];
        answers(&mut s, vec![ToStore::MailDone { req: 5, results, now: 2 }]);
        let want = StoreStats {
            stored_subscriptions: 3,
            outbox_pending: 1,
            emails_sent_total: 1,
            emails_failed_total: 1,
            ..StoreStats::default()
        };
        assert_eq!(stats(&mut s), want);
        // Cleanup forgets the rows, not the counts.
        s.cleanup(10_000_000).unwrap();
        assert_eq!(stats(&mut s), want);
        // An untrusted SUB stores a pending pair, counted as such.
        let now = 10_000_000;
        let sub = |req, email: &str| ToStore::Subscribe {
            req,
            email: email.into(),
            event: "e".into(),
            now,
            trusted: false,
            client: "192.0.2.1".into(),
        };
        answers(&mut s, vec![sub(6, "d@x"), sub(7, "a@x")]);
        let got = stats(&mut s);
        assert_eq!((got.stored_subscriptions, got.pending_subscriptions), (4, 1), "{got:?}");
    }

    /// The schema of notifd before consent (version 1), as its store.rs created it: a
    /// frozen copy, so this test keeps meaning what it says when the schema moves on.
    const FROZEN_V1: &str = include_str!("../tests/data/schema-v1.sql");

    #[test]
    fn a_version_1_database_is_upgraded_with_its_rows_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch("PRAGMA journal_mode=WAL").unwrap();
            old.execute_batch(FROZEN_V1).unwrap();
            old.execute_batch(
                "INSERT INTO subscriptions VALUES ('a@x', 'e', 100), ('b@x', 'e', 200), ('a@x', 'f', 300);
                 INSERT INTO notifications VALUES (7, 'e', 'hi', 150);
                 INSERT INTO outbox VALUES (7, 'a@x', 'pending', 0, 150, NULL, 150);
                 UPDATE meta SET value = 1001 WHERE key = 'next_id';",
            )
            .unwrap();
        }
        let mut s = Store::new(open(&path, &settings()).unwrap(), settings()).unwrap();
        let version: i64 = s.db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let rows: Vec<(String, String, i64, Option<i64>)> = s
            .db
            .prepare("SELECT email, event, created_at, confirmed_at FROM subscriptions ORDER BY created_at")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.len(), 3);
        for (email, event, created, confirmed) in &rows {
            assert_eq!(*confirmed, Some(*created), "{email} {event} is confirmed as of when it was made");
        }
        // What was there goes on: the id block, the waiting email, the pairs.
        let got = answers(&mut s, vec![ToStore::ReserveIds { req: 1, count: 10 }]);
        assert_eq!(got[0], FromStore::Ids { req: 1, start: 1001, end: 1011 });
        let got = answers(&mut s, vec![ToStore::TakeMail { req: 2, max: 10, now: 200 }]);
        let FromStore::Mail { jobs, .. } = &got[0] else { panic!("{got:?}") };
        assert_eq!((jobs[0].id, jobs[0].email.as_str(), jobs[0].text.as_str()), (7, "a@x", "hi"));
        let got = answers(&mut s, vec![ToStore::ListPairs { req: 3, email: "a@x".into() }]);
        let FromStore::Pairs { rows, .. } = &got[0] else { panic!("{got:?}") };
        let listed: Vec<(&str, i64, bool)> =
            rows.iter().map(|r| (r.event.as_str(), r.created_at, r.pending)).collect();
        assert_eq!(listed, [("e", 100, false), ("f", 300, false)]);
        // A secret was made, and is kept across openings.
        let secret = s.secret.clone();
        drop(s);
        let s = Store::new(open(&path, &settings()).unwrap(), settings()).unwrap();
        assert_eq!(s.secret, secret);
    }
}
