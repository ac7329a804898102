//! The records on the pipes between the reactor and its children, and their framing.
//!
//! One `enum` per direction. Variants are append-only: postcard encodes a variant as its
//! index, so the index is wire format. The first record each way is `Hello` with
//! [`VERSION`]; a mismatch is fatal for the child.
//!
//! A frame is a 4-byte little-endian length, then that many postcard bytes. The length is
//! checked against [`MAX_FRAME`] before anything is allocated for it.

pub use crate::config::{LogTarget, SmtpTls, Transport};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;

/// Version of the records below; bumped when a record changes meaning or encoding
/// (2: `MailSettings::sendmail_timeout`; 3: consent: trust on SUB and UNSUB, the
/// consent settings, `MailJob::kind`, `MailSettings::public_url` and `server`; 4:
/// `ToStore::Replay`, `FromStore::Replayed`).
pub const VERSION: u32 = 4;

/// The high bit of a [`MailJob::id`] marks a confirmation email, whose number is the
/// rest: notification ids stay below 2^63, so the two never share a key.
pub const CONFIRMATION_IDS: u64 = 1 << 63;

/// Largest frame body either side accepts. A LIST answer is chunked to stay under it,
/// and batches of emails are cut at [`BATCH_BYTES`].
pub const MAX_FRAME: usize = 1 << 20;

/// Bytes of variable-length fields (addresses, texts) after which a batch of emails or
/// addresses is cut, well under [`MAX_FRAME`].
pub const BATCH_BYTES: usize = MAX_FRAME / 4;

/// Reactor → store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToStore {
    /// First record: the reactor's record version.
    Hello {
        /// The sender's record version, [`VERSION`] if it is this build.
        version: u32,
    },
    /// Upsert a subscription; `now` (Unix seconds) is its timestamp if it is new.
    /// Trusted: confirmed at once (a pending pair too), and an opt-out is lifted.
    /// Untrusted: a new pair is stored pending and its confirmation email queued as the
    /// limits allow; an existing pair is left alone; nothing is stored for an address
    /// that opted out. Answered `Done`, or `Refused` with `Limit` past `max_unconfirmed`.
    Subscribe {
        /// The request number, echoed in the answer.
        req: u64,
        /// The address.
        email: String,
        /// The event name.
        event: String,
        /// Unix seconds now: the timestamp of a new subscription.
        now: i64,
        /// From a trusted connection (PROTOCOL.md *Trust*), or `confirm = false`.
        trusted: bool,
        /// Who asked (the client's address), for the confirmation email; empty if trusted.
        client: String,
    },
    /// Delete a subscription (no error when there was none): trusted, any; untrusted,
    /// only a pending one; with `code` (the pair's UNSUB code), any, from anyone, and a
    /// wrong code is answered `Refused` with `Auth`. The pair's waiting emails go too.
    Unsubscribe {
        /// The request number, echoed in the answer.
        req: u64,
        /// The address.
        email: String,
        /// The event name.
        event: String,
        /// From a trusted connection (PROTOCOL.md *Trust*), or `confirm = false`.
        trusted: bool,
        /// The UNSUB code from a notification email, as typed.
        code: Option<String>,
    },
    /// Store a notification and queue its emails as `mail` says. Idempotent by `id`.
    Publish {
        /// The request number, echoed in the answer.
        req: u64,
        /// The notification id.
        id: u64,
        /// The event name.
        event: String,
        /// The notification text, as published.
        text: String,
        /// Unix seconds now: the notification's timestamp.
        now: i64,
        /// Whom the notification emails.
        mail: MailPlan,
    },
    /// The stored subscriptions of an address, answered with `ListChunk`s.
    List {
        /// The request number, echoed in the answer.
        req: u64,
        /// The address.
        email: String,
    },
    /// Durably reserve the next `count` notification ids (committed with synchronous=FULL).
    ReserveIds {
        /// The request number, echoed in the answer.
        req: u64,
        /// How many ids.
        count: u64,
    },
    /// Hand out up to `max` emails that are due at `now`, leasing them to the caller.
    TakeMail {
        /// The request number, echoed in the answer.
        req: u64,
        /// At most this many emails.
        max: u32,
        /// Unix seconds now: emails due by then are handed out.
        now: i64,
    },
    /// Outcomes reported by a mailer.
    MailDone {
        /// The request number, echoed in the answer.
        req: u64,
        /// One outcome per email.
        results: Vec<MailResult>,
        /// Unix seconds now: when the outcomes were reported.
        now: i64,
    },
    /// Settings that a reload may change; applied between transactions.
    Configure(StoreSettings),
    /// Where to log, after a reload (the log file is reopened even when unchanged).
    Logging(LogSettings),
    /// The counts the database holds, for STATS and `/metrics`; answered with `Stats`.
    Stats {
        /// The request number, echoed in the answer.
        req: u64,
    },
    /// LIST with each pair's state: answered with `Pairs`.
    ListPairs {
        /// The request number, echoed in the answer.
        req: u64,
        /// The address.
        email: String,
    },
    /// CONFIRM: `Confirmed` with the number of pairs confirmed, or `Refused` (`Auth`).
    Confirm {
        /// The request number, echoed in the answer.
        req: u64,
        /// The address.
        email: String,
        /// The CONFIRM code, as typed.
        code: String,
        /// Unix seconds now: the pairs' confirmation time.
        now: i64,
    },
    /// OPTOUT: `Done`, or `Refused` (`Auth`).
    OptOut {
        /// The request number, echoed in the answer.
        req: u64,
        /// The address.
        email: String,
        /// The OPTOUT code, as typed.
        code: String,
        /// Unix seconds now: when the address opted out.
        now: i64,
    },
    /// A confirm, unsubscribe or stop-all link of the HTTP side: what its page shows,
    /// and its button's action. Answered with `LinkPage`.
    OpenLink {
        /// The request number, echoed in the answer.
        req: u64,
        /// The token from the URL.
        token: String,
        /// Show (GET, HEAD), or act (POST).
        action: LinkAction,
        /// Unix seconds now.
        now: i64,
    },
    /// One part of a replay: the notifications of `event` with an id above `after`,
    /// oldest first, at most `max_rows` of them and about `max_bytes` of text (at least
    /// one row); answered with `Replayed`.
    Replay {
        /// The request number, echoed in the answer.
        req: u64,
        /// The event name.
        event: String,
        /// Only ids above this one.
        after: u64,
        /// At most this many rows.
        max_rows: u32,
        /// Stop once the texts add up to this many bytes.
        max_bytes: u32,
    },
}

impl ToStore {
    /// The request id of a record that gets an answer; `None` for the others.
    pub fn req_mut(&mut self) -> Option<&mut u64> {
        match self {
            ToStore::Subscribe { req, .. }
            | ToStore::Unsubscribe { req, .. }
            | ToStore::Publish { req, .. }
            | ToStore::List { req, .. }
            | ToStore::ReserveIds { req, .. }
            | ToStore::TakeMail { req, .. }
            | ToStore::MailDone { req, .. }
            | ToStore::Stats { req }
            | ToStore::ListPairs { req, .. }
            | ToStore::Confirm { req, .. }
            | ToStore::OptOut { req, .. }
            | ToStore::OpenLink { req, .. }
            | ToStore::Replay { req, .. } => Some(req),
            ToStore::Hello { .. } | ToStore::Configure(_) | ToStore::Logging(_) => None,
        }
    }
}

/// Store → reactor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromStore {
    /// First record: the store's record version.
    Hello {
        /// The sender's record version, [`VERSION`] if it is this build.
        version: u32,
    },
    /// The request is committed.
    Done {
        /// The request number, echoed in the answer.
        req: u64,
    },
    /// The request failed in the database (busy, disk full, read-only); it may or may not
    /// have taken effect.
    Failed {
        /// The request number, echoed in the answer.
        req: u64,
        /// Why, for the log.
        reason: String,
    },
    /// Part of a LIST answer: `(event, created_at)` rows in event byte order; `last` ends it.
    ListChunk {
        /// The request number, echoed in the answer.
        req: u64,
        /// `(event, created_at)` rows.
        rows: Vec<(String, i64)>,
        /// This chunk ends the answer.
        last: bool,
    },
    /// Ids `start..end` are reserved for the reactor, durably.
    Ids {
        /// The request number, echoed in the answer.
        req: u64,
        /// The first id reserved.
        start: u64,
        /// One past the last id reserved.
        end: u64,
    },
    /// Emails to send now, and when the next pending one falls due (Unix seconds).
    Mail {
        /// The request number, echoed in the answer.
        req: u64,
        /// The emails.
        jobs: Vec<MailJob>,
        /// When the next pending email falls due (Unix seconds); `None` when none is pending.
        next_due: Option<i64>,
    },
    /// The answer to `ToStore::Stats`.
    Stats {
        /// The request number, echoed in the answer.
        req: u64,
        /// The counts.
        stats: StoreStats,
    },
    /// The request is refused and changed nothing.
    Refused {
        /// The request number, echoed in the answer.
        req: u64,
        /// Why.
        why: Refusal,
    },
    /// CONFIRM's answer: this many pairs became confirmed (0 when already confirmed or
    /// expired).
    Confirmed {
        /// The request number, echoed in the answer.
        req: u64,
        /// Pairs confirmed now.
        count: u32,
    },
    /// Part of a `ListPairs` answer, in event byte order; `last` ends it.
    Pairs {
        /// The request number, echoed in the answer.
        req: u64,
        /// The rows.
        rows: Vec<ListRow>,
        /// This chunk ends the answer.
        last: bool,
    },
    /// `OpenLink`'s answer: `None` for a token this server did not make (a 404).
    LinkPage {
        /// The request number, echoed in the answer.
        req: u64,
        /// What the page shows.
        page: Option<LinkView>,
    },
    /// One part of a replay: `(id, text)` rows in id order.
    Replayed {
        /// The request number, echoed in the answer.
        req: u64,
        /// `(id, text)` rows, oldest first.
        rows: Vec<(u64, String)>,
        /// The highest notification id `keep_days` ever deleted (0: none), for `GAP`.
        deleted: u64,
        /// The part was cut short (`max_rows` or `max_bytes`): ask for the next.
        more: bool,
    },
}

/// What the database counts, as STATS and `/metrics` show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Rows of `subscriptions`.
    pub stored_subscriptions: u64,
    /// Stored subscriptions waiting for their confirmation.
    pub pending_subscriptions: u64,
    /// Emails in the outbox not yet sent nor given up (waiting, or held by a mailer).
    pub outbox_pending: u64,
    /// Emails the transports accepted, counted by the database since it was created.
    pub emails_sent_total: u64,
    /// Emails given up after their last try, counted likewise.
    pub emails_failed_total: u64,
}

/// Why the store refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// A wrong code (`-ERR AUTH`).
    Auth,
    /// `max_unconfirmed` is reached (`-ERR LIMIT`); the text says so.
    Limit(String),
}

/// One stored subscription of an address, for LIST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRow {
    /// The event.
    pub event: String,
    /// When the pair was first made (Unix seconds).
    pub created_at: i64,
    /// Not yet confirmed by the owner of the address.
    pub pending: bool,
}

/// What the button of a link's page does, or showing the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkAction {
    /// GET or HEAD: change nothing.
    Show,
    /// POST of the page's button (or RFC 8058's one-click POST): confirm, or unsubscribe.
    Apply,
    /// POST with `all=1`: the address opts out of everything.
    OptOut,
}

/// Which kind of link a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkKind {
    /// A confirmation email's confirm link (`/confirm/<token>`).
    Confirm,
    /// A notification email's unsubscribe link (`/unsubscribe/<token>`).
    Unsubscribe,
    /// A confirmation email's stop-all link (`/unsubscribe/<token>`).
    OptOut,
}

/// What a link's page shows, after its action if there was one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkView {
    /// The kind of link the token is; the HTTP side answers 404 when it is not the
    /// path's.
    pub kind: LinkKind,
    /// The address.
    pub email: String,
    /// Confirm: the pending events the link covers (after Apply, the confirmed ones).
    /// Unsubscribe: the event, when the pair is stored. OptOut: the stored events.
    pub events: Vec<String>,
    /// Pairs changed by this request's action (0 for Show, and for a repeated POST).
    pub changed: u32,
    /// The address has opted out of everything.
    pub opted_out: bool,
}

/// Reactor → mailer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToMailer {
    /// First record: the reactor's record version.
    Hello {
        /// The sender's record version, [`VERSION`] if it is this build.
        version: u32,
    },
    /// The transport and its settings; sent after `Hello` and again after a reload.
    Configure(MailSettings),
    /// Send these emails and report one `MailResult` for each.
    Send {
        /// The emails.
        jobs: Vec<MailJob>,
    },
    /// Where to log, after a reload (the log file is reopened even when unchanged).
    Logging(LogSettings),
}

/// The log of a child, as a reload leaves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSettings {
    /// Where the log goes.
    #[serde(with = "LogTargetDef")]
    pub target: LogTarget,
    /// The most detailed level logged (postcard: its index, `Off` 0 to `Trace` 5, as the
    /// `log` crate serializes it).
    pub level: log::LevelFilter,
}

/// The wire form of [`LogTarget`], which lives in the configuration: serde's remote
/// derive, so that its variant order here is the wire format.
#[derive(Serialize, Deserialize)]
#[serde(remote = "LogTarget")]
enum LogTargetDef {
    Stderr,
    Syslog,
    File(#[serde(with = "path_bytes")] PathBuf),
}

/// A path as its bytes: any Unix path crosses the pipe, UTF-8 or not (serde's own form
/// of a path refuses what is not UTF-8).
mod path_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(path.as_os_str().as_bytes())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(d)?;
        Ok(PathBuf::from(OsString::from_vec(bytes)))
    }
}

/// Mailer → reactor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromMailer {
    /// First record: the mailer's record version.
    Hello {
        /// The sender's record version, [`VERSION`] if it is this build.
        version: u32,
    },
    /// Outcomes of (some of) the jobs it was sent, in any order.
    Results {
        /// One outcome per email.
        results: Vec<MailResult>,
    },
}

/// Whom a publication emails, decided by the reactor from `mail_policy` and
/// `mail_transport` at publish time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailPlan {
    /// Nobody (policy `none`, or transport `none`).
    Nobody,
    /// Every address subscribed to the event.
    All,
    /// Every subscribed address except these (policy `offline`: they are live).
    AllExcept(Vec<String>),
}

/// One email to one address about one notification. `(id, email)` is its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailJob {
    /// The notification id.
    pub id: u64,
    /// The recipient.
    pub email: String,
    /// The event the notification was published on.
    pub event: String,
    /// The notification text, as published.
    pub text: String,
    /// When the notification was published (Unix seconds).
    pub created_at: i64,
    /// Tries made before this one.
    pub tries: u32,
    /// A notification or a confirmation, with the codes and tokens that only the store,
    /// which holds the secret, can make.
    pub kind: MailKind,
}

impl MailJob {
    /// About the bytes it takes in a record.
    pub fn size(&self) -> usize {
        let kind = match &self.kind {
            MailKind::Notification { unsub_code, unsub_token } => unsub_code.len() + unsub_token.len(),
            MailKind::Confirmation { events, confirm_code, optout_code, confirm_token, optout_token } => {
                events.iter().map(|e| e.event.len() + e.asked_by.len() + 16).sum::<usize>()
                    + confirm_code.len()
                    + optout_code.len()
                    + confirm_token.len()
                    + optout_token.len()
            }
        };
        self.email.len() + self.event.len() + self.text.len() + kind + 32
    }
}

/// What an email is, and what its reader needs to answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailKind {
    /// A notification of `event`: the job's `id` is the notification id.
    Notification {
        /// The UNSUB code of (address, event), printed `XXXX-XXXX-XXXX`.
        unsub_code: String,
        /// The token of its unsubscribe link.
        unsub_token: String,
    },
    /// A confirmation email: the job's `id` is its number with [`CONFIRMATION_IDS`] set;
    /// `event` and `text` are empty, `created_at` is when it was queued.
    Confirmation {
        /// The pending pairs it asks about, and who asked for each.
        events: Vec<AskedPair>,
        /// The CONFIRM code.
        confirm_code: String,
        /// The OPTOUT code.
        optout_code: String,
        /// The token of its confirm link.
        confirm_token: String,
        /// The token of its stop-all link.
        optout_token: String,
    },
}

/// A pending pair as a confirmation email lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskedPair {
    /// The event.
    pub event: String,
    /// The client address that asked.
    pub asked_by: String,
    /// When (Unix seconds).
    pub asked_at: i64,
}

/// Cuts `jobs` into batches of at most [`BATCH_BYTES`] (a single larger job stays alone).
pub fn batches(jobs: Vec<MailJob>) -> Vec<Vec<MailJob>> {
    let mut out: Vec<Vec<MailJob>> = Vec::new();
    let mut size = 0;
    for job in jobs {
        let s = job.size();
        match out.last_mut() {
            Some(last) if size + s <= BATCH_BYTES => last.push(job),
            _ => {
                out.push(vec![job]);
                size = 0;
            }
        }
        size += s;
    }
    out
}

/// What became of one email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailResult {
    /// The notification id of the job.
    pub id: u64,
    /// The recipient of the job.
    pub email: String,
    /// Sent, or why not.
    pub outcome: MailOutcome,
}

/// The outcome of one try.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailOutcome {
    /// Accepted by the transport.
    Sent,
    /// A temporary failure (connection refused, 4xx): try again later.
    Retry(String),
    /// A permanent failure (5xx, invalid message): do not try again.
    Fail(String),
}

/// Store settings that a reload may change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSettings {
    /// `synchronous=FULL` when true, `NORMAL` when false.
    pub sync_full: bool,
    /// Days to keep notifications and finished emails; 0 keeps everything.
    pub keep_days: u32,
    /// Seconds before the second try of an email.
    pub mail_retry_base: u32,
    /// Tries before an email is given up.
    pub mail_max_tries: u32,
    /// How long the store waits on a locked database before it answers `Failed`.
    pub busy_timeout_ms: u32,
    /// Confirmation emails are queued (false when `mail_transport` is `none`).
    pub confirm_mail: bool,
    /// The limits on pending pairs and confirmation emails.
    pub consent: ConsentLimits,
}

/// The limits on pending pairs and confirmation emails: the configuration keys of the
/// same names, with their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentLimits {
    /// Seconds between two confirmation emails to one mailbox.
    pub confirm_interval: u32,
    /// Days a pending pair waits before it is deleted.
    pub confirm_days: u32,
    /// Confirmation emails per hour to one domain.
    pub confirm_domain_rate: u32,
    /// Confirmation emails per hour in total.
    pub confirm_rate: u32,
    /// Pending pairs one address may have; a new one past it deletes the oldest.
    pub max_unconfirmed_per_email: u32,
    /// Pending pairs in the database; past it untrusted SUBs of new pairs are refused.
    pub max_unconfirmed: u64,
}

impl Default for ConsentLimits {
    fn default() -> Self {
        ConsentLimits {
            confirm_interval: 3600,
            confirm_days: 7,
            confirm_domain_rate: 60,
            confirm_rate: 1000,
            max_unconfirmed_per_email: 100,
            max_unconfirmed: 1_000_000,
        }
    }
}

/// How the mailer sends, with the secrets the reactor read for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailSettings {
    /// Which transport.
    pub transport: Transport,
    /// The sender address.
    pub from: String,
    /// SMTP relay host.
    pub smtp_host: String,
    /// SMTP relay port.
    pub smtp_port: u16,
    /// TLS to the relay.
    pub smtp_tls: SmtpTls,
    /// SMTP AUTH user; empty for none.
    pub smtp_user: String,
    /// SMTP AUTH password, read from `smtp_password_file` by the reactor.
    pub smtp_password: String,
    /// Extra CA certificate (PEM) to trust, read from `smtp_ca_file` by the reactor.
    pub smtp_ca_pem: Option<Vec<u8>>,
    /// The sendmail program.
    pub sendmail_path: String,
    /// The spool folder (absolute).
    pub spool_dir: String,
    /// Seconds one sendmail run may take before it is killed and the email retried.
    pub sendmail_timeout: u32,
    /// The base of the links in emails (`public_url`); empty: no links.
    pub public_url: String,
    /// The notifd server as a reader reaches it (`host:port`), named in the emails'
    /// instructions for the UNSUB, CONFIRM and OPTOUT lines.
    pub server: String,
}

/// A frame that cannot be decoded: the pipe is broken and its child is restarted.
#[derive(Debug)]
pub enum FrameError {
    /// The length prefix is over [`MAX_FRAME`].
    TooLarge(usize),
    /// The body is not a valid record.
    Decode(postcard::Error),
    /// The body has bytes after the record.
    Trailing(usize),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes is over the {MAX_FRAME} maximum"),
            FrameError::Decode(e) => write!(f, "undecodable frame: {e}"),
            FrameError::Trailing(n) => write!(f, "frame has {n} trailing bytes"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<postcard::Error> for FrameError {
    fn from(e: postcard::Error) -> Self {
        FrameError::Decode(e)
    }
}

/// Appends one frame holding `msg` to `out`, with no allocation beyond `out`'s growth.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Serializing plain data into a Vec cannot fail.
    let mut v = std::mem::take(out);
    v = postcard::to_extend(msg, v).expect("postcard encodes into a Vec");
    *out = v;
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// `Ok(None)`: not enough bytes yet. `Ok(Some((msg, used)))`: one whole frame.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(head) = buf.first_chunk::<4>() else { return Ok(None) };
    let len = u32::from_le_bytes(*head) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len)); // before any allocation
    }
    let Some(body) = buf.get(4..4 + len) else { return Ok(None) };
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(Some((msg, 4 + len)))
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Bytes read from a pipe, from which whole frames are taken; the unread tail is kept.
///
/// The buffer is zeroed once when it grows, not at every read: `buf[..end]` holds bytes
/// read, `buf[start..end]` those not yet taken.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    /// At least `min` bytes of space to read into; the caller reads into the returned
    /// slice and then calls `filled` with the count.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < min {
            if self.start > 0 {
                // Move the unread tail to the front before growing.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < min {
                self.buf.resize(self.end + min, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// After reading `n` bytes into the slice from `spare`.
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// The next whole frame, if there is one.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match decode(&self.buf[self.start..self.end])? {
            Some((msg, used)) => {
                self.start += used;
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Reads from the non-blocking `src` until it would block, ends, or `budget` bytes
    /// came in (so that one busy pipe cannot hold up everything else).
    pub fn fill_from(&mut self, src: &mut impl Read, budget: usize) -> io::Result<Filled> {
        const CHUNK: usize = 256 * 1024;
        let mut total = 0;
        loop {
            match src.read(self.spare(CHUNK)) {
                Ok(0) => return Ok(Filled::Eof),
                Ok(n) => {
                    self.filled(n);
                    total += n;
                    if total >= budget {
                        return Ok(Filled::Budget);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Filled::Drained),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// How [`FrameReader::fill_from`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The writer closed the pipe.
    Eof,
    /// Everything there was is read.
    Drained,
    /// The budget ran out; more may be waiting.
    Budget,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<ToStore> {
        vec![
            ToStore::Hello { version: VERSION },
            ToStore::Subscribe {
                req: 1,
                email: "a@b".into(),
                event: "e".into(),
                now: 5,
                trusted: false,
                client: "192.0.2.1".into(),
            },
            ToStore::Publish {
                req: u64::MAX,
                id: 7,
                event: "ev".into(),
                text: "héllo wörld".into(),
                now: -1,
                mail: MailPlan::AllExcept(vec!["x@y".into()]),
            },
            ToStore::MailDone {
                req: 3,
                results: vec![MailResult {
                    id: 1,
                    email: "a@b".into(),
                    outcome: MailOutcome::Retry("421".into()),
                }],
                now: 0,
            },
        ]
    }

    #[test]
    fn round_trip_and_incomplete() {
        let mut out = Vec::new();
        for m in sample() {
            encode(&m, &mut out);
        }
        let mut at = 0;
        for m in sample() {
            // Every strict prefix of a frame is "not yet".
            let (got, used): (ToStore, usize) = decode(&out[at..]).unwrap().unwrap();
            for cut in 0..used {
                assert!(decode::<ToStore>(&out[at..at + cut]).unwrap().is_none());
            }
            assert_eq!(got, m);
            at += used;
        }
        assert_eq!(at, out.len());
    }

    #[test]
    fn mail_batches_stay_under_the_frame_maximum() {
        let job = |n: usize| MailJob {
            id: n as u64,
            email: "a@b".into(),
            event: "e".into(),
            text: "x".repeat(60_000),
            created_at: 0,
            tries: 0,
            kind: notification(),
        };
        let jobs: Vec<MailJob> = (0..100).map(job).collect();
        let cut = batches(jobs.clone());
        assert!(cut.len() > 1);
        assert_eq!(cut.concat(), jobs);
        for b in cut {
            let mut out = Vec::new();
            encode(&ToMailer::Send { jobs: b }, &mut out);
            assert!(out.len() - 4 <= MAX_FRAME);
        }
        assert!(batches(Vec::new()).is_empty());
    }

    #[test]
    fn lying_length_is_refused_before_allocation() {
        let buf = u32::MAX.to_le_bytes();
        assert!(matches!(decode::<ToStore>(&buf), Err(FrameError::TooLarge(_))));
        let buf = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(decode::<ToStore>(&buf), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut out = Vec::new();
        encode(&FromStore::Done { req: 1 }, &mut out);
        out[0] += 1;
        out.push(0);
        assert!(matches!(decode::<FromStore>(&out), Err(FrameError::Trailing(1))));
    }

    #[test]
    fn reader_takes_frames_across_reads() {
        let mut wire = Vec::new();
        for m in sample() {
            encode(&m, &mut wire);
        }
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for chunk in wire.chunks(3) {
            let s = r.spare(3);
            s[..chunk.len()].copy_from_slice(chunk);
            r.filled(chunk.len());
            while let Some(m) = r.next_frame::<ToStore>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, sample());
        assert_eq!(r.pending(), 0);
    }

    /// The postcard bytes of a record, as hex.
    fn hex<T: Serialize>(msg: &T) -> String {
        postcard::to_stdvec(msg).unwrap().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mail_settings(transport: Transport, smtp_tls: SmtpTls, smtp_ca_pem: Option<Vec<u8>>) -> MailSettings {
        MailSettings {
            transport,
            from: "f".into(),
            smtp_host: "h".into(),
            smtp_port: 587,
            smtp_tls,
            smtp_user: "u".into(),
            smtp_password: "p".into(),
            smtp_ca_pem,
            sendmail_path: "s".into(),
            spool_dir: "d".into(),
            sendmail_timeout: 60,
            public_url: "u".into(),
            server: "v".into(),
        }
    }

    fn notification() -> MailKind {
        MailKind::Notification { unsub_code: "c".into(), unsub_token: "k".into() }
    }

    fn job() -> MailJob {
        MailJob {
            id: 1,
            email: "a".into(),
            event: "e".into(),
            text: "t".into(),
            created_at: -1,
            tries: 2,
            kind: notification(),
        }
    }

    fn confirmation_job() -> MailJob {
        MailJob {
            id: CONFIRMATION_IDS | 1,
            email: "a".into(),
            event: String::new(),
            text: String::new(),
            created_at: 1,
            tries: 0,
            kind: MailKind::Confirmation {
                events: vec![AskedPair { event: "e".into(), asked_by: "b".into(), asked_at: 2 }],
                confirm_code: "c".into(),
                optout_code: "o".into(),
                confirm_token: "k".into(),
                optout_token: "l".into(),
            },
        }
    }

    fn result(outcome: MailOutcome) -> MailResult {
        MailResult { id: 3, email: "b".into(), outcome }
    }

    fn logging(target: LogTarget, level: log::LevelFilter) -> LogSettings {
        LogSettings { target, level }
    }

    /// `(index, count)` of `m`'s variant among the listed ones, by a match with no `_`
    /// arm: a new variant does not compile until it is listed, and then `golden` wants
    /// a sample of it.
    macro_rules! variant_of {
        ($m:expr, $($pat:pat),+ $(,)?) => {{
            let names = [$(stringify!($pat)),+];
            let name = match $m { $($pat => stringify!($pat)),+ };
            (names.iter().position(|n| *n == name).unwrap(), names.len())
        }};
    }

    /// Checks each sample's bytes, and that the samples cover every variant; the first
    /// byte of each record is its variant index, which is wire format (append-only).
    fn golden<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(
        samples: &[(T, &str)],
        variant: fn(&T) -> (usize, usize),
    ) {
        let mut seen = vec![false; samples.first().map_or(0, |(m, _)| variant(m).1)];
        for (m, want) in samples {
            assert_eq!(hex(m), *want, "{m:?}");
            let bytes = postcard::to_stdvec(m).unwrap();
            let (back, rest) = postcard::take_from_bytes::<T>(&bytes).unwrap();
            assert!(rest.is_empty() && back == *m, "{m:?}");
            assert_eq!(bytes[0] as usize, variant(m).0, "{m:?}");
            seen[variant(m).0] = true;
        }
        assert!(seen.iter().all(|&s| s), "a variant has no golden sample: {seen:?}");
    }

    #[test]
    fn golden_bytes_to_store() {
        use log::LevelFilter as L;
        let store = StoreSettings {
            sync_full: true,
            keep_days: 30,
            mail_retry_base: 60,
            mail_max_tries: 5,
            busy_timeout_ms: 1000,
            confirm_mail: true,
            consent: ConsentLimits::default(),
        };
        let publish =
            |now, mail| ToStore::Publish { req: 3, id: 4, event: "e".into(), text: "t".into(), now, mail };
        let samples = [
            (ToStore::Hello { version: 1 }, "0001"),
            (
                ToStore::Subscribe {
                    req: 1,
                    email: "a@b".into(),
                    event: "e".into(),
                    now: 300,
                    trusted: true,
                    client: String::new(),
                },
                "0101036140620165d8040100",
            ),
            (
                ToStore::Subscribe {
                    req: 1,
                    email: "a@b".into(),
                    event: "e".into(),
                    now: 300,
                    trusted: false,
                    client: "c".into(),
                },
                "0101036140620165d804000163",
            ),
            (
                ToStore::Unsubscribe {
                    req: 2,
                    email: "a@b".into(),
                    event: "e".into(),
                    trusted: true,
                    code: None,
                },
                "02020361406201650100",
            ),
            (
                ToStore::Unsubscribe {
                    req: 2,
                    email: "a@b".into(),
                    event: "e".into(),
                    trusted: false,
                    code: Some("k".into()),
                },
                "02020361406201650001016b",
            ),
            (publish(-2, MailPlan::Nobody), "030304016501740300"),
            (publish(0, MailPlan::All), "030304016501740001"),
            (publish(0, MailPlan::AllExcept(vec!["x".into()])), "030304016501740002010178"),
            (ToStore::List { req: 5, email: "a".into() }, "04050161"),
            (ToStore::ReserveIds { req: 6, count: 10_000 }, "0506904e"),
            (ToStore::TakeMail { req: 7, max: 256, now: 1 }, "0607800202"),
            (
                ToStore::MailDone {
                    req: 8,
                    results: vec![
                        result(MailOutcome::Sent),
                        result(MailOutcome::Retry("r".into())),
                        result(MailOutcome::Fail("f".into())),
                    ],
                    now: 2,
                },
                "0708030301620003016201017203016202016604",
            ),
            (ToStore::Configure(store), "08011e3c05e80701901c073ce80764c0843d"),
            (ToStore::Logging(logging(LogTarget::Stderr, L::Off)), "090000"),
            (ToStore::Logging(logging(LogTarget::Syslog, L::Error)), "090101"),
            (ToStore::Logging(logging(LogTarget::File("/l".into()), L::Warn)), "0902022f6c02"),
            (ToStore::Logging(logging(LogTarget::Stderr, L::Info)), "090003"),
            (ToStore::Logging(logging(LogTarget::Stderr, L::Debug)), "090004"),
            (ToStore::Logging(logging(LogTarget::Stderr, L::Trace)), "090005"),
            (ToStore::Stats { req: 9 }, "0a09"),
            (ToStore::ListPairs { req: 9, email: "a".into() }, "0b090161"),
            (ToStore::Confirm { req: 10, email: "a".into(), code: "c".into(), now: 3 }, "0c0a0161016306"),
            (ToStore::OptOut { req: 11, email: "a".into(), code: "c".into(), now: 3 }, "0d0b0161016306"),
            (
                ToStore::OpenLink { req: 12, token: "t".into(), action: LinkAction::Show, now: 3 },
                "0e0c01740006",
            ),
            (
                ToStore::OpenLink { req: 12, token: "t".into(), action: LinkAction::Apply, now: 3 },
                "0e0c01740106",
            ),
            (
                ToStore::OpenLink { req: 12, token: "t".into(), action: LinkAction::OptOut, now: 3 },
                "0e0c01740206",
            ),
            (
                ToStore::Replay { req: 9, event: "e".into(), after: 300, max_rows: 2, max_bytes: 128 },
                "0f090165ac02028001",
            ),
        ];
        golden(&samples, |m| {
            use ToStore::*;
            variant_of!(
                m,
                Hello { .. },
                Subscribe { .. },
                Unsubscribe { .. },
                Publish { .. },
                List { .. },
                ReserveIds { .. },
                TakeMail { .. },
                MailDone { .. },
                Configure(_),
                Logging(_),
                Stats { .. },
                ListPairs { .. },
                Confirm { .. },
                OptOut { .. },
                OpenLink { .. },
                Replay { .. }
            )
        });
    }

    #[test]
    fn golden_bytes_from_store() {
        let samples = [
            (FromStore::Hello { version: 1 }, "0001"),
            (FromStore::Done { req: 300 }, "01ac02"),
            (FromStore::Failed { req: 1, reason: "r".into() }, "02010172"),
            (FromStore::ListChunk { req: 2, rows: vec![("e".into(), 5)], last: true }, "03020101650a01"),
            (FromStore::Ids { req: 3, start: 1, end: 10_001 }, "040301914e"),
            (
                FromStore::Mail { req: 4, jobs: vec![job()], next_due: Some(9) },
                "050401010161016501740102000163016b0112",
            ),
            (FromStore::Mail { req: 4, jobs: vec![], next_due: None }, "05040000"),
            (
                FromStore::Stats {
                    req: 5,
                    stats: StoreStats {
                        stored_subscriptions: 1,
                        pending_subscriptions: 2,
                        outbox_pending: 3,
                        emails_sent_total: 300,
                        emails_failed_total: 5,
                    },
                },
                "0605010203ac0205",
            ),
            (
                FromStore::Mail { req: 4, jobs: vec![confirmation_job()], next_due: None },
                "05040181808080808080808001016100000200010101650162040163016f016b016c00",
            ),
            (FromStore::Refused { req: 5, why: Refusal::Auth }, "070500"),
            (FromStore::Refused { req: 5, why: Refusal::Limit("l".into()) }, "070501016c"),
            (FromStore::Confirmed { req: 6, count: 2 }, "080602"),
            (
                FromStore::Pairs {
                    req: 7,
                    rows: vec![ListRow { event: "e".into(), created_at: 5, pending: true }],
                    last: true,
                },
                "09070101650a0101",
            ),
            (FromStore::LinkPage { req: 8, page: None }, "0a0800"),
            (
                FromStore::LinkPage {
                    req: 8,
                    page: Some(LinkView {
                        kind: LinkKind::Confirm,
                        email: "a".into(),
                        events: vec!["e".into()],
                        changed: 1,
                        opted_out: false,
                    }),
                },
                "0a08010001610101650100",
            ),
            (
                FromStore::LinkPage {
                    req: 8,
                    page: Some(LinkView {
                        kind: LinkKind::Unsubscribe,
                        email: "a".into(),
                        events: vec![],
                        changed: 0,
                        opted_out: true,
                    }),
                },
                "0a0801010161000001",
            ),
            (
                FromStore::LinkPage {
                    req: 8,
                    page: Some(LinkView {
                        kind: LinkKind::OptOut,
                        email: "a".into(),
                        events: vec![],
                        changed: 0,
                        opted_out: true,
                    }),
                },
                "0a0801020161000001",
            ),
            (
                FromStore::Replayed { req: 5, rows: vec![(300, "t".into())], deleted: 7, more: true },
                "0b0501ac0201740701",
            ),
        ];
        golden(&samples, |m| {
            use FromStore::*;
            variant_of!(
                m,
                Hello { .. },
                Done { .. },
                Failed { .. },
                ListChunk { .. },
                Ids { .. },
                Mail { .. },
                Stats { .. },
                Refused { .. },
                Confirmed { .. },
                Pairs { .. },
                LinkPage { .. },
                Replayed { .. }
            )
        });
    }

    #[test]
    fn golden_bytes_to_mailer() {
        let samples = [
            (ToMailer::Hello { version: 1 }, "0001"),
            (
                ToMailer::Configure(mail_settings(Transport::Smtp, SmtpTls::None, None)),
                "010001660168cb04000175017000017301643c01750176",
            ),
            (
                ToMailer::Configure(mail_settings(Transport::Sendmail, SmtpTls::Starttls, Some(vec![7]))),
                "010101660168cb040101750170010107017301643c01750176",
            ),
            (
                ToMailer::Configure(mail_settings(Transport::Spool, SmtpTls::Tls, None)),
                "010201660168cb04020175017000017301643c01750176",
            ),
            (
                ToMailer::Configure(mail_settings(Transport::None, SmtpTls::None, None)),
                "010301660168cb04000175017000017301643c01750176",
            ),
            (ToMailer::Send { jobs: vec![job()] }, "0201010161016501740102000163016b"),
            (ToMailer::Logging(logging(LogTarget::Syslog, log::LevelFilter::Info)), "030103"),
        ];
        golden(&samples, |m| {
            use ToMailer::*;
            variant_of!(m, Hello { .. }, Configure(_), Send { .. }, Logging(_))
        });
    }

    #[test]
    fn golden_bytes_from_mailer() {
        let samples = [
            (FromMailer::Hello { version: 1 }, "0001"),
            (
                FromMailer::Results { results: vec![result(MailOutcome::Retry("421".into()))] },
                "01010301620103343231",
            ),
        ];
        golden(&samples, |m| {
            use FromMailer::*;
            variant_of!(m, Hello { .. }, Results { .. })
        });
    }

    #[test]
    fn a_path_that_is_not_utf8_crosses_the_pipe() {
        use std::os::unix::ffi::OsStringExt;
        let path = PathBuf::from(std::ffi::OsString::from_vec(vec![b'/', 0xff]));
        let m = ToMailer::Logging(logging(LogTarget::File(path), log::LevelFilter::Debug));
        let mut out = Vec::new();
        encode(&m, &mut out);
        assert_eq!(decode::<ToMailer>(&out).unwrap().unwrap().0, m);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<ToStore>(&bytes);
            let _ = decode::<FromStore>(&bytes);
            let _ = decode::<ToMailer>(&bytes);
            let _ = decode::<FromMailer>(&bytes);
        }

        #[test]
        fn encode_then_decode(req in any::<u64>(), email in ".{0,40}", event in "[a-z.]{1,20}", now in any::<i64>()) {
            let m = ToStore::Subscribe { req, email, event, now, trusted: false, client: "::1".into() };
            let mut out = Vec::new();
            encode(&m, &mut out);
            let (got, used): (ToStore, usize) = decode(&out).unwrap().unwrap();
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(got, m);
        }
    }
}
