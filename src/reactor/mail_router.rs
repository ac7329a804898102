//! Routing email: due emails from the store's outbox to the mailers, their outcomes
//! back to the store. The outbox is the queue; the reactor only holds what a mailer has
//! in hand, bounded by MAILER_CAPACITY per mailer.

use super::{Reactor, Target};
use crate::ipc::{FromMailer, MailJob, MailOutcome, MailResult, MailSettings, ToMailer, ToStore};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Emails a mailer holds at once.
const MAILER_CAPACITY: usize = 256;

/// Which mailer holds which email, and when to ask the store for more.
pub(super) struct MailRouter {
    pub(super) settings: MailSettings,
    /// Per mailer: the jobs it holds, for replay after its restart, with the number of
    /// that mailer's deaths each was held for.
    pub(super) held: Vec<HashMap<MailKey, (MailJob, u8)>>,
    /// A TakeMail is in flight.
    pub(super) asking: bool,
    /// Something may be due: ask when there is room.
    pub(super) wanted: bool,
    /// The next pending email falls due then.
    pub(super) next_due: Option<Instant>,
}

/// An email's identity: notification id and address.
pub(super) type MailKey = (u64, Box<str>);

impl Reactor {
    pub(super) fn mailer_room(&self) -> usize {
        (1..self.children.len())
            .filter(|&i| self.children[i].up())
            .map(|i| MAILER_CAPACITY.saturating_sub(self.mail.held[i - 1].len()))
            .sum()
    }

    /// Asks the store for due emails when a mailer has room and something may be due.
    pub(super) fn pump_mail(&mut self, now: Instant) {
        if self.children.len() < 2 || self.mail.asking || self.stopping.is_some() {
            return;
        }
        if self.mail.next_due.is_some_and(|t| t <= now) {
            self.mail.next_due = None;
            self.mail.wanted = true;
        }
        let room = self.mailer_room();
        if !self.mail.wanted || room == 0 || !self.children[0].up() {
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
        let mut batches: Vec<Vec<MailJob>> = vec![Vec::new(); self.children.len()];
        for job in jobs {
            let key = (job.id, Box::from(job.email.as_str()));
            if self.mail.held.iter().any(|h| h.contains_key(&key)) {
                continue;
            }
            let best = (1..self.children.len()).max_by_key(|&i| {
                (self.children[i].up(), MAILER_CAPACITY.saturating_sub(self.mail.held[i - 1].len()))
            });
            let Some(i) = best else { break };
            self.mail.held[i - 1].insert(key, (job.clone(), 0));
            batches[i].push(job);
        }
        for (i, jobs) in batches.into_iter().enumerate() {
            for jobs in crate::ipc::batches(jobs) {
                self.children[i].send(&ToMailer::Send { jobs });
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
        self.mail.held[i - 1].retain(|_, (job, deaths)| {
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
                self.children[i].name,
                poisoned.len()
            );
            let now = crate::ipc::unix_now();
            self.send_store(|req| ToStore::MailDone { req, results: poisoned, now }, Target::MailDone);
        }
    }

    pub(super) fn dispatch_mailer(&mut self, i: usize, m: FromMailer) -> Result<(), String> {
        match m {
            FromMailer::Hello { version } => self.hello(i, version),
            FromMailer::Results { results } => {
                for r in &results {
                    self.mail.held[i - 1].remove(&(r.id, Box::from(r.email.as_str())));
                }
                let now = crate::ipc::unix_now();
                self.send_store(|req| ToStore::MailDone { req, results, now }, Target::MailDone);
                self.mail.wanted = true;
                Ok(())
            }
        }
    }
}
