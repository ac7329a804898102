//! Routing email: due emails from the store's outbox to the mailers, their outcomes
//! back to the store. The outbox is the queue; the reactor only holds what a mailer has
//! in hand, bounded by MAILER_CAPACITY per mailer.

use super::child_link::Child;
use super::store_link::Target;
use super::supervise::{ChildId, Fault};
use super::{Reactor, Source};
use crate::ipc::{FromMailer, MailJob, MailOutcome, MailResult, MailSettings, ToMailer, ToStore};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Emails a mailer holds at once.
const MAILER_CAPACITY: usize = 256;

/// The settings every mailer gets, and when to ask the store for more emails.
pub(super) struct MailRouter {
    pub(super) settings: MailSettings,
    /// A TakeMail is in flight.
    pub(super) asking: bool,
    /// Something may be due: ask when there is room.
    pub(super) wanted: bool,
    /// The next pending email falls due then.
    pub(super) next_due: Option<Instant>,
}

impl MailRouter {
    pub(super) fn new(settings: MailSettings) -> MailRouter {
        MailRouter { settings, asking: false, wanted: true, next_due: None }
    }
}

/// One mailer child and the emails it holds.
pub(super) struct MailerLink {
    pub(super) child: Child,
    /// The jobs it holds, for replay after its restart, with the number of its deaths
    /// each was held for.
    pub(super) held: HashMap<MailKey, (MailJob, u8)>,
}

impl MailerLink {
    /// The mailer at index `i` (named from 1 in the log).
    pub(super) fn new(i: usize) -> MailerLink {
        let name = format!("notifd-mailer {}", i + 1);
        let child = Child::new(name, Source::MailerRead(i).token(), Source::MailerWrite(i).token());
        MailerLink { child, held: HashMap::new() }
    }

    /// Emails it can take now.
    fn room(&self) -> usize {
        MAILER_CAPACITY.saturating_sub(self.held.len())
    }
}

/// An email's identity: notification id and address.
type MailKey = (u64, Box<str>);

impl Reactor {
    fn mailer_room(&self) -> usize {
        self.mailers.iter().filter(|m| m.child.up()).map(MailerLink::room).sum()
    }

    /// Asks the store for due emails when a mailer has room and something may be due.
    pub(super) fn pump_mail(&mut self, now: Instant) {
        if self.mailers.is_empty() || self.mail.asking || self.stopping.is_some() {
            return;
        }
        if self.mail.next_due.is_some_and(|t| t <= now) {
            self.mail.next_due = None;
            self.mail.wanted = true;
        }
        let room = self.mailer_room();
        if !self.mail.wanted || room == 0 || !self.store.child.up() {
            return;
        }
        self.mail.wanted = false;
        self.mail.asking = true;
        let now_unix = crate::ipc::unix_now();
        self.send_store(|req| ToStore::TakeMail { req, max: room as u32, now: now_unix }, Target::TakeMail);
    }

    pub(super) fn got_mail(&mut self, jobs: Vec<MailJob>, next_due: Option<i64>) {
        self.mail.asking = false;
        let full = !jobs.is_empty();
        self.mail.next_due = next_due.map(|due| {
            let wait = (due - crate::ipc::unix_now()).clamp(0, 3600) as u64;
            Instant::now() + Duration::from_secs(wait)
        });
        // Hand each job to the mailer with the most room; skip one a mailer already holds
        // (the store released its lease after a store restart). The store has leased
        // these jobs: when every mailer died while the TakeMail was in flight, a dead one
        // holds them and gets them when it restarts, rather than nobody until the store's
        // next start.
        let mut batches: Vec<Vec<MailJob>> = vec![Vec::new(); self.mailers.len()];
        for job in jobs {
            let key = (job.id, Box::from(job.email.as_str()));
            if self.mailers.iter().any(|m| m.held.contains_key(&key)) {
                continue;
            }
            let best =
                (0..self.mailers.len()).max_by_key(|&i| (self.mailers[i].child.up(), self.mailers[i].room()));
            let Some(i) = best else { break };
            self.mailers[i].held.insert(key, (job.clone(), 0));
            batches[i].push(job);
        }
        for (m, jobs) in self.mailers.iter_mut().zip(batches) {
            for jobs in crate::ipc::batches(jobs) {
                m.child.send(&ToMailer::Send { jobs });
            }
        }
        if full {
            self.mail.wanted = true;
        }
    }

    /// An email held by a mailer that died twice is reported as a failed try instead
    /// of being handed out a third time: the outbox retries it later, with a limit.
    pub(super) fn mailer_lost(&mut self, i: usize) {
        let mut poisoned = Vec::new();
        self.mailers[i].held.retain(|_, (job, deaths)| {
            *deaths += 1;
            if *deaths >= 2 {
                poisoned.push(MailResult {
                    id: job.id,
                    email: job.email.clone(),
                    outcome: MailOutcome::Retry("the mailer died twice sending this email".into()),
                });
                false
            } else {
                true
            }
        });
        if !poisoned.is_empty() {
            log::warn!(
                "{}: {} emails were held through two deaths; reported as failed tries",
                self.mailers[i].child.name,
                poisoned.len()
            );
            let now = crate::ipc::unix_now();
            self.send_store(|req| ToStore::MailDone { req, results: poisoned, now }, Target::MailDone);
        }
    }

    /// Handles one record from mailer `i`.
    pub(super) fn dispatch_mailer(&mut self, i: usize, m: FromMailer) -> Result<(), Fault> {
        if !self.mailers[i].child.greeted && !matches!(m, FromMailer::Hello { .. }) {
            return Err(Fault::Broken("a record before its hello".into()));
        }
        match m {
            FromMailer::Hello { version } => return self.hello(ChildId::Mailer(i), version),
            FromMailer::Results { results } => {
                for r in &results {
                    self.mailers[i].held.remove(&(r.id, Box::from(r.email.as_str())));
                }
                let now = crate::ipc::unix_now();
                self.send_store(|req| ToStore::MailDone { req, results, now }, Target::MailDone);
                self.mail.wanted = true;
            }
        }
        Ok(())
    }
}
