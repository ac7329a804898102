//! The store's side of consent: pending pairs, confirmation emails and their limits,
//! codes, links and opt-outs (PROTOCOL.md *Consent*).
//!
//! The limits on confirmation emails are counted from the `confirmations` table, so
//! they hold across restarts. A pending pair whose email a limit holds back waits; the
//! store looks for such pairs again when the reactor asks for mail, at most once per
//! [`CONFIRM_SCAN_EVERY`], and tells the reactor when to ask through `next_due`.

use super::{ctx, Store, StoreError};
use crate::consent::{self, Code, Link};
use crate::ipc::{
    AskedPair, FromStore, LinkAction, LinkKind, LinkView, ListRow, MailJob, MailKind, Refusal,
    CONFIRMATION_IDS,
};
use rusqlite::{params, OptionalExtension};

/// Seconds between two looks for pending pairs whose confirmation email waits on a limit.
pub(super) const CONFIRM_SCAN_EVERY: i64 = 60;

/// Unanswered confirmation emails one mailbox may have within `confirm_days`.
const MAX_UNANSWERED: i64 = 3;

/// Addresses looked at in one scan for waiting confirmations: a bound on the work of
/// one batch; the rest wait for the next scan.
const SCAN_BATCH: i64 = 10_000;

/// What a confirmation code is good for, after its email: codes of emails older than
/// this many times `confirm_days` are no longer known (their rows are deleted).
const CONFIRMATIONS_KEPT: i64 = 2;

fn days(d: u32) -> i64 {
    i64::from(d) * 86_400
}

impl Store {
    /// A trusted SUB: a new pair confirmed at once, a pending one confirmed, an opt-out
    /// of the address lifted.
    pub(super) fn subscribe(&mut self, email: &str, event: &str, now: i64) -> Result<(), StoreError> {
        let mut st = self
            .db
            .prepare_cached(
                "INSERT INTO subscriptions(email, event, created_at, confirmed_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT DO NOTHING",
            )
            .map_err(ctx("subscribe"))?;
        if st.execute(params![email, event, now]).map_err(ctx("subscribe"))? == 0 {
            let confirmed = self
                .db
                .prepare_cached(
                    "UPDATE subscriptions SET confirmed_at = ?3
                     WHERE email = ?1 AND event = ?2 AND confirmed_at IS NULL",
                )
                .map_err(ctx("subscribe"))?
                .execute(params![email, event, now])
                .map_err(ctx("subscribe"))?;
            if confirmed > 0 {
                self.pending_total = None;
            }
        }
        if self.optouts_maybe {
            self.db
                .prepare_cached("DELETE FROM optouts WHERE mailbox = ?1")
                .map_err(ctx("lift an opt-out"))?
                .execute(params![consent::mailbox(email)])
                .map_err(ctx("lift an opt-out"))?;
        }
        Ok(())
    }

    /// The next pending pair's sequence number. Numbers are never reused, so a
    /// confirmation code never covers a pair made after its email.
    fn take_seq(&self) -> Result<i64, StoreError> {
        self.db
            .prepare_cached("UPDATE meta SET value = value + 1 WHERE key = 'next_seq' RETURNING value - 1")
            .map_err(ctx("sequence number"))?
            .query_row([], |r| r.get(0))
            .map_err(ctx("sequence number"))
    }

    /// An untrusted SUB (PROTOCOL.md *Consent* 1 to 3). Only `max_unconfirmed` refuses it.
    pub(super) fn subscribe_pending(
        &mut self,
        email: &str,
        event: &str,
        now: i64,
        client: &str,
    ) -> Result<Option<Refusal>, StoreError> {
        let exists: bool = self
            .db
            .prepare_cached("SELECT 1 FROM subscriptions WHERE email = ?1 AND event = ?2")
            .map_err(ctx("subscribe"))?
            .exists(params![email, event])
            .map_err(ctx("subscribe"))?;
        if exists {
            return Ok(None);
        }
        let max = self.settings.consent.max_unconfirmed;
        if self.pending_total()? >= max {
            return Ok(Some(Refusal::Limit(format!(
                "the server holds its maximum of {max} unconfirmed subscriptions; try again in a day"
            ))));
        }
        if self.opted_out(email)? {
            return Ok(None);
        }
        self.db
            .prepare_cached(
                "INSERT INTO subscriptions(email, event, created_at, confirmed_at) VALUES (?1, ?2, ?3, NULL)",
            )
            .map_err(ctx("subscribe"))?
            .execute(params![email, event, now])
            .map_err(ctx("subscribe"))?;
        let seq = self.take_seq()?;
        self.db
            .prepare_cached("INSERT OR REPLACE INTO asked(email, event, seq, asked_by, asked_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .map_err(ctx("subscribe"))?
            .execute(params![email, event, seq, client, now])
            .map_err(ctx("subscribe"))?;
        self.pending_total = self.pending_total.map(|n| n + 1);
        // Past max_unconfirmed_per_email, the oldest go.
        let dropped = self
            .db
            .prepare_cached(
                "DELETE FROM subscriptions WHERE email = ?1 AND confirmed_at IS NULL AND event IN
                   (SELECT a.event FROM asked a JOIN subscriptions s USING (email, event)
                    WHERE a.email = ?1 AND s.confirmed_at IS NULL
                    ORDER BY a.seq DESC LIMIT -1 OFFSET ?2)",
            )
            .map_err(ctx("max_unconfirmed_per_email"))?
            .execute(params![email, self.settings.consent.max_unconfirmed_per_email.max(1)])
            .map_err(ctx("max_unconfirmed_per_email"))?;
        if dropped > 0 {
            self.forget_asked(email)?;
            self.pending_total = self.pending_total.map(|n| n.saturating_sub(dropped as u64));
        }
        if !self.queue_confirmation(email, now)? {
            self.confirmations_waiting = true;
        }
        Ok(None)
    }

    /// Deletes the `asked` rows of `email` whose pair is gone.
    fn forget_asked(&self, email: &str) -> Result<(), StoreError> {
        self.db
            .prepare_cached(
                "DELETE FROM asked WHERE email = ?1 AND NOT EXISTS
                   (SELECT 1 FROM subscriptions s WHERE s.email = asked.email AND s.event = asked.event)",
            )
            .map_err(ctx("forget who asked"))?
            .execute(params![email])
            .map_err(ctx("forget who asked"))?;
        Ok(())
    }

    /// Pending pairs in the whole database, counted once and then kept up to date.
    fn pending_total(&mut self) -> Result<u64, StoreError> {
        if let Some(n) = self.pending_total {
            return Ok(n);
        }
        let n: i64 = self
            .db
            .query_row("SELECT count(*) FROM subscriptions WHERE confirmed_at IS NULL", [], |r| r.get(0))
            .map_err(ctx("count pending pairs"))?;
        self.pending_total = Some(n as u64);
        Ok(n as u64)
    }

    fn opted_out(&self, email: &str) -> Result<bool, StoreError> {
        self.db
            .prepare_cached("SELECT 1 FROM optouts WHERE mailbox = ?1")
            .map_err(ctx("opt-outs"))?
            .exists(params![consent::mailbox(email)])
            .map_err(ctx("opt-outs"))
    }

    /// UNSUB: trusted removes any pair; untrusted only a pending one; with a code, any
    /// pair from anyone, and a wrong code is refused.
    pub(super) fn unsubscribe(
        &mut self,
        email: &str,
        event: &str,
        trusted: bool,
        code: Option<&str>,
    ) -> Result<Option<Refusal>, StoreError> {
        if let Some(code) = code {
            let right = self.secret.unsub_code(email, event);
            if !Code::parse(code).is_some_and(|c| c.matches(&right)) {
                return Ok(Some(Refusal::Auth));
            }
            self.remove_pair(email, event, false)?;
        } else {
            self.remove_pair(email, event, !trusted)?;
        }
        Ok(None)
    }

    /// Deletes a pair (only a pending one when `pending_only`) and its emails still
    /// waiting in the outbox, in the caller's transaction. Whether a pair went.
    fn remove_pair(&mut self, email: &str, event: &str, pending_only: bool) -> Result<bool, StoreError> {
        let sql = if pending_only {
            "DELETE FROM subscriptions WHERE email = ?1 AND event = ?2 AND confirmed_at IS NULL
             RETURNING confirmed_at"
        } else {
            "DELETE FROM subscriptions WHERE email = ?1 AND event = ?2 RETURNING confirmed_at"
        };
        let gone: Option<Option<i64>> = self
            .db
            .prepare_cached(sql)
            .map_err(ctx("unsubscribe"))?
            .query_row(params![email, event], |r| r.get(0))
            .optional()
            .map_err(ctx("unsubscribe"))?;
        match gone {
            None => return Ok(false),
            Some(None) => self.pending_total = self.pending_total.map(|n| n.saturating_sub(1)),
            Some(Some(_)) => {}
        }
        self.db
            .prepare_cached("DELETE FROM asked WHERE email = ?1 AND event = ?2")
            .map_err(ctx("unsubscribe"))?
            .execute(params![email, event])
            .map_err(ctx("unsubscribe"))?;
        self.db
            .prepare_cached(
                // EXISTS, not IN: a lookup by id for each of the address's waiting emails,
                // rather than a scan of every kept notification for the event.
                "DELETE FROM outbox WHERE email = ?1 AND state IN ('pending', 'sending')
                 AND EXISTS (SELECT 1 FROM notifications n WHERE n.id = outbox.notification_id AND n.event = ?2)",
            )
            .map_err(ctx("unsubscribe: waiting emails"))?
            .execute(params![email, event])
            .map_err(ctx("unsubscribe: waiting emails"))?;
        Ok(true)
    }

    /// The address opts out of everything: its pairs and their waiting emails (its
    /// confirmation emails too) are deleted, and nothing is stored for it again until a
    /// trusted SUB. Returns the pairs deleted.
    fn opt_out(&mut self, email: &str, now: i64) -> Result<u32, StoreError> {
        self.optouts_maybe = true;
        self.db
            .prepare_cached("INSERT INTO optouts(mailbox, at) VALUES (?1, ?2) ON CONFLICT DO NOTHING")
            .map_err(ctx("opt out"))?
            .execute(params![consent::mailbox(email), now])
            .map_err(ctx("opt out"))?;
        self.db
            .prepare_cached("DELETE FROM outbox WHERE email = ?1 AND state IN ('pending', 'sending')")
            .map_err(ctx("opt out: waiting emails"))?
            .execute(params![email])
            .map_err(ctx("opt out: waiting emails"))?;
        let gone = self
            .db
            .prepare_cached("DELETE FROM subscriptions WHERE email = ?1")
            .map_err(ctx("opt out"))?
            .execute(params![email])
            .map_err(ctx("opt out"))?;
        self.forget_asked(email)?;
        self.pending_total = None;
        Ok(gone as u32)
    }

    /// OPTOUT with its code.
    pub(super) fn opt_out_with_code(
        &mut self,
        email: &str,
        code: &str,
        now: i64,
    ) -> Result<Option<Refusal>, StoreError> {
        let right = self.secret.optout_code(email);
        if !Code::parse(code).is_some_and(|c| c.matches(&right)) {
            return Ok(Some(Refusal::Auth));
        }
        self.opt_out(email, now)?;
        Ok(None)
    }

    /// CONFIRM: the code is checked against each confirmation email still known for the
    /// address (each stands for its last listed pair), and confirms the pending pairs
    /// up to the one it matches.
    pub(super) fn confirm(
        &mut self,
        email: &str,
        code: &str,
        now: i64,
    ) -> Result<Result<u32, Refusal>, StoreError> {
        let Some(code) = Code::parse(code) else { return Ok(Err(Refusal::Auth)) };
        let seqs: Vec<i64> = self
            .db
            .prepare_cached("SELECT last_seq FROM confirmations WHERE email = ?1 ORDER BY id DESC")
            .map_err(ctx("confirm"))?
            .query_map(params![email], |r| r.get(0))
            .map_err(ctx("confirm"))?
            .collect::<Result<_, _>>()
            .map_err(ctx("confirm"))?;
        // Every candidate is compared, so the time taken does not tell which matched.
        let mut matched = None;
        for &seq in &seqs {
            if self.secret.confirm_code(email, seq as u64).matches(&code) {
                matched = Some(seq);
            }
        }
        match matched {
            Some(seq) => Ok(Ok(self.confirm_up_to(email, seq, now)?)),
            None => Ok(Err(Refusal::Auth)),
        }
    }

    /// Confirms the pending pairs of `email` with sequence numbers up to `seq`, and marks
    /// the confirmation emails they answer.
    fn confirm_up_to(&mut self, email: &str, seq: i64, now: i64) -> Result<u32, StoreError> {
        let n = self
            .db
            .prepare_cached(
                "UPDATE subscriptions SET confirmed_at = ?3
                 WHERE email = ?1 AND confirmed_at IS NULL
                 AND event IN (SELECT event FROM asked WHERE email = ?1 AND seq <= ?2)",
            )
            .map_err(ctx("confirm"))?
            .execute(params![email, seq, now])
            .map_err(ctx("confirm"))?;
        self.db
            .prepare_cached(
                "UPDATE confirmations SET answered_at = ?3
                 WHERE email = ?1 AND last_seq <= ?2 AND answered_at IS NULL",
            )
            .map_err(ctx("confirm"))?
            .execute(params![email, seq, now])
            .map_err(ctx("confirm"))?;
        self.pending_total = self.pending_total.map(|t| t.saturating_sub(n as u64));
        Ok(n as u32)
    }

    /// A link's page, and its button's action. `None` for a token this server did not make.
    pub(super) fn open_link(
        &mut self,
        token: &str,
        action: LinkAction,
        now: i64,
    ) -> Result<Option<LinkView>, StoreError> {
        let Some(link) = self.secret.open(token) else { return Ok(None) };
        let (kind, email) = match &link {
            Link::Confirm { email, .. } => (LinkKind::Confirm, email.clone()),
            Link::Unsubscribe { email, .. } => (LinkKind::Unsubscribe, email.clone()),
            Link::OptOut { email } => (LinkKind::OptOut, email.clone()),
        };
        let mut changed = 0;
        if action == LinkAction::OptOut {
            changed = self.opt_out(&email, now)?;
        }
        let events = match (&link, action) {
            (_, LinkAction::OptOut) => Vec::new(),
            (Link::Confirm { seq, .. }, LinkAction::Show) => self.events_of(&email, *seq as i64, true)?,
            (Link::Confirm { seq, .. }, LinkAction::Apply) => {
                changed = self.confirm_up_to(&email, *seq as i64, now)?;
                // A repeated POST shows the same page: the pairs the link covers.
                self.events_of(&email, *seq as i64, false)?
            }
            (Link::Unsubscribe { event, .. }, LinkAction::Show) => {
                let stored = self
                    .db
                    .prepare_cached("SELECT 1 FROM subscriptions WHERE email = ?1 AND event = ?2")
                    .map_err(ctx("link"))?
                    .exists(params![email, event])
                    .map_err(ctx("link"))?;
                if stored {
                    vec![event.clone()]
                } else {
                    Vec::new()
                }
            }
            (Link::Unsubscribe { event, .. }, LinkAction::Apply) => {
                changed = u32::from(self.remove_pair(&email, event, false)?);
                vec![event.clone()]
            }
            (Link::OptOut { .. }, LinkAction::Show) => self
                .db
                .prepare_cached("SELECT event FROM subscriptions WHERE email = ?1 ORDER BY event")
                .map_err(ctx("link"))?
                .query_map(params![email], |r| r.get(0))
                .map_err(ctx("link"))?
                .collect::<Result<_, _>>()
                .map_err(ctx("link"))?,
            (Link::OptOut { .. }, LinkAction::Apply) => {
                changed = self.opt_out(&email, now)?;
                Vec::new()
            }
        };
        let opted_out = self.opted_out(&email)?;
        Ok(Some(LinkView { kind, email, events, changed, opted_out }))
    }

    /// The events of `email`'s pairs asked for by untrusted SUBs up to sequence number
    /// `seq`, pending ones only or all that are still stored.
    fn events_of(&self, email: &str, seq: i64, pending_only: bool) -> Result<Vec<String>, StoreError> {
        let sql = if pending_only {
            "SELECT a.event FROM asked a JOIN subscriptions s USING (email, event)
             WHERE a.email = ?1 AND a.seq <= ?2 AND s.confirmed_at IS NULL ORDER BY a.event"
        } else {
            "SELECT a.event FROM asked a JOIN subscriptions s USING (email, event)
             WHERE a.email = ?1 AND a.seq <= ?2 ORDER BY a.event"
        };
        self.db
            .prepare_cached(sql)
            .map_err(ctx("link"))?
            .query_map(params![email, seq], |r| r.get(0))
            .map_err(ctx("link"))?
            .collect::<Result<_, _>>()
            .map_err(ctx("link"))
    }

    /// LIST with each pair's state, in chunks.
    pub(super) fn list_pairs(
        &self,
        req: u64,
        email: &str,
        answers: &mut Vec<FromStore>,
    ) -> Result<(), StoreError> {
        let mut st = self
            .db
            .prepare_cached(
                "SELECT event, created_at, confirmed_at IS NULL FROM subscriptions WHERE email = ?1 ORDER BY event",
            )
            .map_err(ctx("list"))?;
        let mut rows = st.query(params![email]).map_err(ctx("list"))?;
        let mut chunk = Vec::new();
        while let Some(row) = rows.next().map_err(ctx("list"))? {
            chunk.push(ListRow {
                event: row.get(0).map_err(ctx("list"))?,
                created_at: row.get(1).map_err(ctx("list"))?,
                pending: row.get(2).map_err(ctx("list"))?,
            });
            if chunk.len() == super::LIST_CHUNK {
                answers.push(FromStore::Pairs { req, rows: std::mem::take(&mut chunk), last: false });
            }
        }
        answers.push(FromStore::Pairs { req, rows: chunk, last: true });
        Ok(())
    }

    /// Queues a confirmation email to `email` for its pending pairs that no earlier one
    /// listed, if the limits allow it now. `false` when pairs wait on a limit.
    fn queue_confirmation(&mut self, email: &str, now: i64) -> Result<bool, StoreError> {
        let s = &self.settings.consent;
        let (last_listed, newest): (i64, Option<i64>) = self
            .db
            .prepare_cached(
                "SELECT (SELECT coalesce(max(last_seq), 0) FROM confirmations WHERE email = ?1),
                        (SELECT max(a.seq) FROM asked a JOIN subscriptions s USING (email, event)
                         WHERE a.email = ?1 AND s.confirmed_at IS NULL)",
            )
            .map_err(ctx("confirmation"))?
            .query_row(params![email], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(ctx("confirmation"))?;
        let Some(newest) = newest.filter(|&n| n > last_listed) else { return Ok(true) };
        if !self.settings.confirm_mail {
            // No email can go; the pairs expire.
            return Ok(true);
        }
        let mailbox = consent::mailbox(email);
        let domain = consent::domain(email);
        let (recent, unanswered, in_domain, in_total): (i64, i64, i64, i64) = self
            .db
            .prepare_cached(
                "SELECT (SELECT count(*) FROM confirmations WHERE mailbox = ?1 AND sent_at > ?3),
                        (SELECT count(*) FROM confirmations WHERE mailbox = ?1 AND sent_at > ?4
                           AND answered_at IS NULL),
                        (SELECT count(*) FROM confirmations WHERE domain = ?2 AND sent_at > ?5),
                        (SELECT count(*) FROM confirmations WHERE sent_at > ?5)",
            )
            .map_err(ctx("confirmation limits"))?
            .query_row(
                params![
                    mailbox,
                    domain,
                    now - i64::from(s.confirm_interval),
                    now - days(s.confirm_days),
                    now - 3600
                ],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(ctx("confirmation limits"))?;
        if recent > 0
            || unanswered >= MAX_UNANSWERED
            || in_domain >= i64::from(s.confirm_domain_rate)
            || in_total >= i64::from(s.confirm_rate)
        {
            return Ok(false);
        }
        self.db
            .prepare_cached(
                "INSERT INTO confirmations(email, mailbox, domain, last_seq, sent_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(ctx("confirmation"))?
            .execute(params![email, mailbox, domain, newest, now])
            .map_err(ctx("confirmation"))?;
        let n = self.db.last_insert_rowid() as u64;
        self.db
            .prepare_cached(
                "INSERT INTO outbox(notification_id, email, state, tries, next_try_at, updated_at)
                 VALUES (?1, ?2, 'pending', 0, ?3, ?3)",
            )
            .map_err(ctx("confirmation"))?
            .execute(params![(CONFIRMATION_IDS | n) as i64, email, now])
            .map_err(ctx("confirmation"))?;
        Ok(true)
    }

    /// Queues the confirmation emails that limits held back and now allow, at most once
    /// per [`CONFIRM_SCAN_EVERY`]. When pairs still wait, returns when to look again.
    pub(super) fn queue_waiting_confirmations(&mut self, now: i64) -> Result<Option<i64>, StoreError> {
        if !self.confirmations_waiting {
            return Ok(None);
        }
        let next = self.last_confirm_scan.saturating_add(CONFIRM_SCAN_EVERY);
        if now < next {
            return Ok(Some(next));
        }
        self.last_confirm_scan = now;
        let emails: Vec<String> = self
            .db
            .prepare_cached(
                "SELECT a.email FROM asked a JOIN subscriptions s USING (email, event)
                 WHERE s.confirmed_at IS NULL GROUP BY a.email
                 HAVING max(a.seq) > (SELECT coalesce(max(c.last_seq), 0) FROM confirmations c
                                      WHERE c.email = a.email)
                 LIMIT ?1",
            )
            .map_err(ctx("waiting confirmations"))?
            .query_map(params![SCAN_BATCH], |r| r.get(0))
            .map_err(ctx("waiting confirmations"))?
            .collect::<Result<_, _>>()
            .map_err(ctx("waiting confirmations"))?;
        let mut waiting = emails.len() as i64 == SCAN_BATCH;
        for email in &emails {
            if !self.queue_confirmation(email, now)? {
                waiting = true;
            }
        }
        self.confirmations_waiting = waiting;
        Ok(waiting.then_some(now + CONFIRM_SCAN_EVERY))
    }

    /// The job for confirmation email number `n`, built from what is pending now; `None`
    /// when nothing it listed is still pending (confirmed, expired, unsubscribed).
    pub(super) fn confirmation_job(
        &self,
        n: u64,
        email: &str,
        tries: u32,
    ) -> Result<Option<MailJob>, StoreError> {
        let row: Option<(i64, i64)> = self
            .db
            .prepare_cached("SELECT last_seq, sent_at FROM confirmations WHERE id = ?1 AND email = ?2")
            .map_err(ctx("confirmation email"))?
            .query_row(params![n as i64, email], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(ctx("confirmation email"))?;
        let Some((last_seq, sent_at)) = row else { return Ok(None) };
        let events: Vec<AskedPair> = self
            .db
            .prepare_cached(
                "SELECT a.event, a.asked_by, a.asked_at FROM asked a JOIN subscriptions s USING (email, event)
                 WHERE a.email = ?1 AND a.seq <= ?2 AND s.confirmed_at IS NULL ORDER BY a.event",
            )
            .map_err(ctx("confirmation email"))?
            .query_map(params![email, last_seq], |r| {
                Ok(AskedPair { event: r.get(0)?, asked_by: r.get(1)?, asked_at: r.get(2)? })
            })
            .map_err(ctx("confirmation email"))?
            .collect::<Result<_, _>>()
            .map_err(ctx("confirmation email"))?;
        if events.is_empty() {
            return Ok(None);
        }
        let seq = last_seq as u64;
        let kind = MailKind::Confirmation {
            events,
            confirm_code: self.secret.confirm_code(email, seq).to_string(),
            optout_code: self.secret.optout_code(email).to_string(),
            confirm_token: self.secret.token(&Link::Confirm { email: email.into(), seq }),
            optout_token: self.secret.token(&Link::OptOut { email: email.into() }),
        };
        Ok(Some(MailJob {
            id: CONFIRMATION_IDS | n,
            email: email.into(),
            event: String::new(),
            text: String::new(),
            created_at: sent_at,
            tries,
            kind,
        }))
    }

    /// What a notification email to `email` about `event` needs to say how to stop it.
    pub(super) fn notification_kind(&self, email: &str, event: &str) -> MailKind {
        MailKind::Notification {
            unsub_code: self.secret.unsub_code(email, event).to_string(),
            unsub_token: self.secret.token(&Link::Unsubscribe { email: email.into(), event: event.into() }),
        }
    }

    /// Deletes pairs still pending after `confirm_days`, and confirmation emails too old
    /// for their codes to be kept. Its own transaction; run with the cleanup.
    pub fn expire_pending(&mut self, now: i64) -> Result<(), StoreError> {
        let cutoff = now - days(self.settings.consent.confirm_days);
        let forgotten = now - CONFIRMATIONS_KEPT * days(self.settings.consent.confirm_days);
        self.pending_total = None;
        self.db
            .execute_batch(&format!(
                "BEGIN;
                 DELETE FROM subscriptions WHERE confirmed_at IS NULL AND created_at < {cutoff};
                 DELETE FROM asked WHERE asked_at < {forgotten} OR NOT EXISTS
                   (SELECT 1 FROM subscriptions s WHERE s.email = asked.email AND s.event = asked.event);
                 DELETE FROM confirmations WHERE sent_at < {forgotten};
                 COMMIT;"
            ))
            .map_err(ctx("expire pending pairs"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{answers, settings};
    use super::super::{open, Store};
    use super::*;
    use crate::ipc::{MailPlan, StoreSettings, ToStore};

    fn store_with(settings: StoreSettings) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.db"), &settings).unwrap();
        (dir, Store::new(db, settings).unwrap())
    }

    fn store() -> (tempfile::TempDir, Store) {
        store_with(settings())
    }

    fn sub(req: u64, email: &str, event: &str, now: i64, trusted: bool) -> ToStore {
        let client = if trusted { String::new() } else { "192.0.2.1".into() };
        ToStore::Subscribe { req, email: email.into(), event: event.into(), now, trusted, client }
    }

    fn unsub(req: u64, email: &str, event: &str, trusted: bool, code: Option<&str>) -> ToStore {
        ToStore::Unsubscribe {
            req,
            email: email.into(),
            event: event.into(),
            trusted,
            code: code.map(Into::into),
        }
    }

    fn one(s: &mut Store, r: ToStore) -> FromStore {
        let mut got = answers(s, vec![r]);
        assert_eq!(got.len(), 1, "{got:?}");
        got.remove(0)
    }

    /// (event, pending) of an address, in event order.
    fn pairs(s: &mut Store, email: &str) -> Vec<(String, bool)> {
        let FromStore::Pairs { rows, last: true, .. } =
            one(s, ToStore::ListPairs { req: 99, email: email.into() })
        else {
            panic!()
        };
        rows.into_iter().map(|r| (r.event, r.pending)).collect()
    }

    fn p(event: &str, pending: bool) -> (String, bool) {
        (event.to_string(), pending)
    }

    /// Jobs due at `now`, all handed out (and leased).
    fn take(s: &mut Store, now: i64) -> Vec<MailJob> {
        let FromStore::Mail { jobs, .. } = one(s, ToStore::TakeMail { req: 98, max: 1000, now }) else {
            panic!()
        };
        jobs
    }

    fn count(s: &Store, sql: &str) -> i64 {
        s.db.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    fn confirm_code(job: &MailJob) -> (String, Vec<String>) {
        let MailKind::Confirmation { confirm_code, events, .. } = &job.kind else { panic!("{job:?}") };
        (confirm_code.clone(), events.iter().map(|e| e.event.clone()).collect())
    }

    #[test]
    fn trusted_and_untrusted_subscriptions() {
        let (_d, mut s) = store();
        assert_eq!(one(&mut s, sub(1, "a@x", "e", 10, false)), FromStore::Done { req: 1 });
        assert_eq!(pairs(&mut s, "a@x"), [p("e", true)]);
        // An untrusted SUB of an existing pair changes nothing; a trusted one confirms it.
        one(&mut s, sub(2, "a@x", "e", 20, false));
        assert_eq!(pairs(&mut s, "a@x"), [p("e", true)]);
        one(&mut s, sub(3, "a@x", "e", 30, true));
        assert_eq!(pairs(&mut s, "a@x"), [p("e", false)]);
        // ... and an untrusted SUB never changes a confirmed pair back.
        one(&mut s, sub(4, "a@x", "e", 40, false));
        assert_eq!(pairs(&mut s, "a@x"), [p("e", false)]);
        let created: i64 = count(&s, "SELECT created_at FROM subscriptions WHERE email = 'a@x'");
        assert_eq!(created, 10, "the first timestamp stays");
    }

    #[test]
    fn publish_emails_confirmed_pairs_only() {
        let (_d, mut s) = store();
        answers(
            &mut s,
            vec![
                sub(1, "pending@x", "e", 10, false),
                sub(2, "confirmed@x", "e", 10, true),
                ToStore::Publish {
                    req: 3,
                    id: 1,
                    event: "e".into(),
                    text: "t".into(),
                    now: 20,
                    mail: MailPlan::All,
                },
            ],
        );
        let jobs = take(&mut s, 20);
        let notes: Vec<&str> = jobs
            .iter()
            .filter(|j| matches!(j.kind, MailKind::Notification { .. }))
            .map(|j| j.email.as_str())
            .collect();
        assert_eq!(notes, ["confirmed@x"]);
        let MailKind::Notification { unsub_code, unsub_token } =
            &jobs.iter().find(|j| j.id == 1).unwrap().kind
        else {
            panic!()
        };
        assert_eq!(*unsub_code, s.secret.unsub_code("confirmed@x", "e").to_string());
        assert_eq!(
            s.secret.open(unsub_token),
            Some(Link::Unsubscribe { email: "confirmed@x".into(), event: "e".into() })
        );
    }

    #[test]
    fn a_confirmation_email_and_its_code() {
        let (_d, mut s) = store();
        answers(&mut s, vec![sub(1, "a@x", "e1", 10, false), sub(2, "a@x", "e2", 11, false)]);
        let jobs = take(&mut s, 11);
        // The first SUB queued an email listing e1; e2 waits on confirm_interval.
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert!(jobs[0].id & CONFIRMATION_IDS != 0);
        let (code, events) = confirm_code(&jobs[0]);
        assert_eq!(events, ["e1"]);
        let MailKind::Confirmation { events: asked, .. } = &jobs[0].kind else { panic!() };
        assert_eq!((asked[0].asked_by.as_str(), asked[0].asked_at), ("192.0.2.1", 10));
        // A wrong code: AUTH; case and dashes do not matter; the code covers e1 only.
        let confirm =
            |code: &str| ToStore::Confirm { req: 5, email: "a@x".into(), code: code.into(), now: 50 };
        assert_eq!(one(&mut s, confirm("0000-0000-0000")), FromStore::Refused { req: 5, why: Refusal::Auth });
        assert_eq!(one(&mut s, confirm("nonsense")), FromStore::Refused { req: 5, why: Refusal::Auth });
        let wrong_address = ToStore::Confirm { req: 5, email: "b@x".into(), code: code.clone(), now: 50 };
        assert_eq!(one(&mut s, wrong_address), FromStore::Refused { req: 5, why: Refusal::Auth });
        let typed = code.replace('-', "").to_lowercase();
        assert_eq!(one(&mut s, confirm(&typed)), FromStore::Confirmed { req: 5, count: 1 });
        assert_eq!(pairs(&mut s, "a@x"), [p("e1", false), p("e2", true)]);
        // Again: nothing more.
        assert_eq!(one(&mut s, confirm(&code)), FromStore::Confirmed { req: 5, count: 0 });
        // After confirm_interval (from the first email, at 10) the waiting pair gets its
        // own email, when the reactor asks and the store looks again (once a minute).
        assert!(take(&mut s, 10 + 3599).is_empty());
        assert!(take(&mut s, 10 + 3600).is_empty(), "looked less than a minute ago");
        let jobs = take(&mut s, 10 + 3599 + CONFIRM_SCAN_EVERY);
        assert_eq!(jobs.len(), 1);
        let (code2, events) = confirm_code(&jobs[0]);
        assert_eq!(events, ["e2"]);
        assert_ne!(code2, code);
        assert_eq!(one(&mut s, confirm(&code2)), FromStore::Confirmed { req: 5, count: 1 });
    }

    #[test]
    fn a_code_does_not_cover_pairs_made_after_its_email() {
        let (_d, mut s) = store();
        one(&mut s, sub(1, "a@x", "e1", 10, false));
        let (code, _) = confirm_code(&take(&mut s, 10)[0]);
        one(&mut s, sub(2, "a@x", "e2", 20, false));
        let c = ToStore::Confirm { req: 3, email: "a@x".into(), code, now: 30 };
        assert_eq!(one(&mut s, c), FromStore::Confirmed { req: 3, count: 1 });
        assert_eq!(pairs(&mut s, "a@x"), [p("e1", false), p("e2", true)]);
    }

    #[test]
    fn confirmation_limits_per_mailbox_domain_and_total() {
        let mut set = settings();
        set.consent.confirm_interval = 100;
        set.consent.confirm_domain_rate = 2;
        set.consent.confirm_rate = 3;
        let (_d, mut s) = store_with(set);
        let sent = |s: &Store| count(s, "SELECT count(*) FROM confirmations");
        // The same mailbox with other case and a +tag: one email per interval.
        answers(
            &mut s,
            vec![
                sub(1, "Ana@x.org", "e", 0, false),
                sub(2, "ana+news@X.org", "e", 0, false),
                sub(3, "ANA+b@x.org", "e", 0, false),
            ],
        );
        assert_eq!(sent(&s), 1);
        // A second address in the domain: the domain's limit (2 an hour) is reached.
        answers(&mut s, vec![sub(4, "bo@x.org", "e", 1, false), sub(5, "cy@x.org", "e", 1, false)]);
        assert_eq!(sent(&s), 2);
        // Another domain: the total (3 an hour) is reached with it.
        answers(&mut s, vec![sub(6, "a@y.org", "e", 2, false), sub(7, "a@z.org", "e", 2, false)]);
        assert_eq!(sent(&s), 3);
        // Those waiting are queued by the store when a limit allows, not by another SUB.
        take(&mut s, 3);
        assert_eq!(sent(&s), 3);
        // An hour later: one of ana's tags (one per interval), and the total allows one
        // more (a@z.org); cy@x.org waits on the total again.
        take(&mut s, 3601);
        assert_eq!(sent(&s), 5);
        let ana = |s: &Store| count(s, "SELECT count(*) FROM confirmations WHERE mailbox = 'ana@x.org'");
        assert_eq!(ana(&s), 2);
        // A minute on, the total's hour has moved past a@y.org: cy@x.org goes; ana's last
        // tag still waits on her interval.
        take(&mut s, 3601 + 60);
        assert_eq!(sent(&s), 6);
        assert_eq!(ana(&s), 2);
        take(&mut s, 2 * 3600 + 100);
        assert_eq!(sent(&s), 7, "in the next hour, the rest");
        assert_eq!(ana(&s), 3);
    }

    #[test]
    fn three_unanswered_then_none() {
        let mut set = settings();
        set.consent.confirm_interval = 10;
        let (_d, mut s) = store_with(set);
        for i in 0..5 {
            one(&mut s, sub(i, "a@x", &format!("e{i}"), i as i64 * 20, false));
        }
        assert_eq!(count(&s, "SELECT count(*) FROM confirmations"), 3);
        // Answering one lets the next go.
        let jobs = take(&mut s, 100);
        let (code, _) = confirm_code(jobs.last().unwrap());
        one(&mut s, ToStore::Confirm { req: 9, email: "a@x".into(), code, now: 100 });
        take(&mut s, 200);
        assert_eq!(count(&s, "SELECT count(*) FROM confirmations"), 4);
    }

    #[test]
    fn limits_on_pending_pairs() {
        let mut set = settings();
        set.consent.max_unconfirmed_per_email = 3;
        set.consent.max_unconfirmed = 5;
        let (_d, mut s) = store_with(set);
        for i in 0..5 {
            assert_eq!(
                one(&mut s, sub(i, "a@x", &format!("e{i}"), i as i64, false)),
                FromStore::Done { req: i }
            );
        }
        // The oldest went.
        assert_eq!(pairs(&mut s, "a@x"), [p("e2", true), p("e3", true), p("e4", true)]);
        answers(&mut s, vec![sub(10, "b@x", "e", 10, false), sub(11, "c@x", "e", 10, false)]);
        let refused = one(&mut s, sub(12, "d@x", "e", 10, false));
        assert!(matches!(refused, FromStore::Refused { req: 12, why: Refusal::Limit(_) }), "{refused:?}");
        assert!(pairs(&mut s, "d@x").is_empty());
        // An existing pair and a trusted SUB are not refused.
        assert_eq!(one(&mut s, sub(13, "c@x", "e", 10, false)), FromStore::Done { req: 13 });
        assert_eq!(one(&mut s, sub(14, "d@x", "e", 10, true)), FromStore::Done { req: 14 });
        // Room again after a removal.
        one(&mut s, unsub(15, "c@x", "e", false, None));
        assert_eq!(one(&mut s, sub(16, "e@x", "e", 10, false)), FromStore::Done { req: 16 });
    }

    #[test]
    fn unsubscribing() {
        let (_d, mut s) = store();
        answers(&mut s, vec![sub(1, "a@x", "pending", 1, false), sub(2, "a@x", "confirmed", 1, true)]);
        // Untrusted: a pending pair goes, a confirmed one stays.
        answers(
            &mut s,
            vec![unsub(3, "a@x", "pending", false, None), unsub(4, "a@x", "confirmed", false, None)],
        );
        assert_eq!(pairs(&mut s, "a@x"), [p("confirmed", false)]);
        // With a wrong code: AUTH, nothing changes; with the right one, from anyone: gone.
        let wrong = one(&mut s, unsub(5, "a@x", "confirmed", false, Some("0000-0000-0000")));
        assert_eq!(wrong, FromStore::Refused { req: 5, why: Refusal::Auth });
        let other = s.secret.unsub_code("a@x", "other").to_string();
        assert!(matches!(
            one(&mut s, unsub(6, "a@x", "confirmed", true, Some(&other))),
            FromStore::Refused { .. }
        ));
        assert_eq!(pairs(&mut s, "a@x"), [p("confirmed", false)]);
        let code = s.secret.unsub_code("a@x", "confirmed").to_string();
        assert_eq!(one(&mut s, unsub(7, "a@x", "confirmed", false, Some(&code))), FromStore::Done { req: 7 });
        assert!(pairs(&mut s, "a@x").is_empty());
        // Trusted: any.
        one(&mut s, sub(8, "b@x", "e", 1, true));
        one(&mut s, unsub(9, "b@x", "e", true, None));
        assert!(pairs(&mut s, "b@x").is_empty());
    }

    #[test]
    fn a_removal_takes_the_pairs_waiting_emails_with_it() {
        let (_d, mut s) = store();
        answers(
            &mut s,
            vec![
                sub(1, "a@x", "e", 1, true),
                sub(2, "a@x", "f", 1, true),
                sub(3, "b@x", "e", 1, true),
                ToStore::Publish {
                    req: 4,
                    id: 1,
                    event: "e".into(),
                    text: "t".into(),
                    now: 2,
                    mail: MailPlan::All,
                },
                ToStore::Publish {
                    req: 5,
                    id: 2,
                    event: "f".into(),
                    text: "t".into(),
                    now: 2,
                    mail: MailPlan::All,
                },
                unsub(6, "a@x", "e", true, None),
            ],
        );
        let left: Vec<(u64, String)> = take(&mut s, 2).into_iter().map(|j| (j.id, j.email)).collect();
        assert_eq!(left, [(1, "b@x".to_string()), (2, "a@x".to_string())]);
    }

    #[test]
    fn opting_out() {
        let (_d, mut s) = store();
        answers(&mut s, vec![sub(1, "a@x", "e", 1, true), sub(2, "a@x", "f", 1, false)]);
        let wrong = ToStore::OptOut { req: 3, email: "a@x".into(), code: "0000-0000-0000".into(), now: 5 };
        assert_eq!(one(&mut s, wrong), FromStore::Refused { req: 3, why: Refusal::Auth });
        let code = s.secret.optout_code("a@x").to_string();
        let right = ToStore::OptOut { req: 4, email: "a@x".into(), code, now: 5 };
        assert_eq!(one(&mut s, right), FromStore::Done { req: 4 });
        assert!(pairs(&mut s, "a@x").is_empty());
        assert_eq!(
            count(&s, "SELECT count(*) FROM outbox WHERE state = 'pending'"),
            0,
            "its confirmation went too"
        );
        // Nothing is stored for it, and no email goes, whatever the +tag; the reply is the same.
        assert_eq!(one(&mut s, sub(5, "A+x@X", "g", 6, false)), FromStore::Done { req: 5 });
        assert!(pairs(&mut s, "A+x@X").is_empty());
        assert!(take(&mut s, 100_000).is_empty());
        // A trusted SUB brings it back.
        one(&mut s, sub(6, "a@x", "h", 7, true));
        one(&mut s, sub(7, "a@x", "i", 7, false));
        assert_eq!(pairs(&mut s, "a@x"), [p("h", false), p("i", true)]);
    }

    #[test]
    fn links() {
        let (_d, mut s) = store();
        answers(&mut s, vec![sub(1, "a@x", "e1", 1, false), sub(2, "a@x", "e2", 1, true)]);
        let jobs = take(&mut s, 1);
        let MailKind::Confirmation { confirm_token, optout_token, .. } = &jobs[0].kind else { panic!() };
        let open = |s: &mut Store, token: &str, action| {
            let FromStore::LinkPage { page, .. } =
                one(s, ToStore::OpenLink { req: 1, token: token.into(), action, now: 9 })
            else {
                panic!()
            };
            page
        };
        // GET changes nothing; POST confirms; a repeated POST shows the same and changes nothing.
        let shown = open(&mut s, confirm_token, LinkAction::Show).unwrap();
        assert_eq!(
            (shown.kind, shown.email.as_str(), shown.events.clone(), shown.changed),
            (LinkKind::Confirm, "a@x", vec!["e1".to_string()], 0)
        );
        assert_eq!(pairs(&mut s, "a@x"), [p("e1", true), p("e2", false)]);
        let posted = open(&mut s, confirm_token, LinkAction::Apply).unwrap();
        assert_eq!(posted.changed, 1);
        assert_eq!(pairs(&mut s, "a@x"), [p("e1", false), p("e2", false)]);
        let again = open(&mut s, confirm_token, LinkAction::Apply).unwrap();
        assert_eq!((again.changed, again.events), (0, posted.events));
        // A forged or truncated token: nothing.
        assert_eq!(open(&mut s, &confirm_token[..confirm_token.len() - 1], LinkAction::Apply), None);
        assert_eq!(open(&mut s, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", LinkAction::Show), None);
        // The unsubscribe link of a notification email.
        let token = s.secret.token(&Link::Unsubscribe { email: "a@x".into(), event: "e1".into() });
        let shown = open(&mut s, &token, LinkAction::Show).unwrap();
        assert_eq!(
            (shown.kind, shown.events.clone(), shown.changed),
            (LinkKind::Unsubscribe, vec!["e1".to_string()], 0)
        );
        assert_eq!(open(&mut s, &token, LinkAction::Apply).unwrap().changed, 1);
        assert_eq!(open(&mut s, &token, LinkAction::Apply).unwrap().changed, 0);
        assert_eq!(pairs(&mut s, "a@x"), [p("e2", false)]);
        // all=1: the address opts out.
        let out = open(&mut s, &token, LinkAction::OptOut).unwrap();
        assert!(out.opted_out && out.changed == 1);
        assert!(pairs(&mut s, "a@x").is_empty());
        let shown = open(&mut s, optout_token, LinkAction::Show).unwrap();
        assert_eq!((shown.kind, shown.opted_out), (LinkKind::OptOut, true));
    }

    #[test]
    fn pending_pairs_expire() {
        let (_d, mut s) = store();
        answers(&mut s, vec![sub(1, "a@x", "old", 0, false), sub(2, "a@x", "kept", 0, true)]);
        s.expire_pending(7 * 86_400).unwrap();
        assert_eq!(pairs(&mut s, "a@x").len(), 2);
        s.expire_pending(7 * 86_400 + 1).unwrap();
        assert_eq!(pairs(&mut s, "a@x"), [p("kept", false)]);
        // Its confirmation email, if still waiting, is not sent for nothing.
        assert!(take(&mut s, 7 * 86_400 + 1).iter().all(|j| j.id & CONFIRMATION_IDS == 0));
    }

    #[test]
    fn no_confirmation_email_without_a_transport() {
        let mut set = settings();
        set.confirm_mail = false;
        let (_d, mut s) = store_with(set);
        one(&mut s, sub(1, "a@x", "e", 1, false));
        assert!(take(&mut s, 100_000).is_empty());
        assert_eq!(count(&s, "SELECT count(*) FROM confirmations"), 0);
    }
}
