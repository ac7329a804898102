//! Forking, losing and restarting the children, and reaping them.

use super::{Reactor, Target};
use crate::ipc::{self, FromMailer, FromStore, MailJob, ToMailer, ToStore};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use std::io;
use std::time::{Duration, Instant};

impl Reactor {
    /// Start-up only (it blocks): waits until the store has said hello, so that `-d`
    /// and init scripts report a database that cannot be opened instead of a daemon
    /// that answers every command with UNAVAILABLE.
    pub fn wait_store(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut events = mio::Events::with_capacity(64);
        while !self.children[0].greeted {
            if !self.children[0].up() {
                return Err("the store exited at start-up (the log says why)".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the store did not start within {} s", timeout.as_secs()));
            }
            if let Err(e) = self.poll.poll(&mut events, Some(left.min(Duration::from_millis(100)))) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll: {e}"));
                }
            }
            if events.iter().any(|ev| ev.token() == mio::Token(super::CHILD_BASE)) {
                self.child_readable(0);
            }
            self.flush_children();
        }
        Ok(())
    }

    pub(super) fn child_readable(&mut self, i: usize) {
        let mut more = false;
        let eof = match self.children[i].read(&mut more) {
            Ok(eof) => eof,
            Err(e) => return self.child_lost(i, &format!("read: {e}")),
        };
        loop {
            let res = if i == 0 {
                self.children[0].next_frame::<FromStore>().map(|m| m.map(|m| self.dispatch_store(m)))
            } else {
                self.children[i].next_frame::<FromMailer>().map(|m| m.map(|m| self.dispatch_mailer(i, m)))
            };
            match res {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(why))) => return self.child_lost(i, &why),
                Ok(None) => break,
                Err(e) => return self.child_lost(i, &format!("broken record: {e}")),
            }
        }
        if eof {
            self.child_lost(i, "pipe closed");
        } else if more {
            // Come back next turn: edge-triggered, and the budget stopped us early.
            self.resume_child.push(i);
        }
    }

    pub(super) fn start_child(&mut self, i: usize) -> io::Result<()> {
        let spawned = if i == 0 {
            let db = self.cfg.database.clone();
            let settings = self.store_settings.clone();
            crate::spawn::spawn("notifd-store", "store", move |input, output| {
                crate::store::run(&db, settings, input, output)
            })?
        } else {
            crate::spawn::spawn("notifd-mailer", "mailer", crate::mailer::run)?
        };
        let pid = spawned.pid;
        self.children[i].attach(spawned, self.poll.registry())?;
        log::info!("{} started (pid {pid})", self.children[i].name);
        if i == 0 {
            self.children[0].send(&ToStore::Hello { version: ipc::VERSION });
            self.replay_store();
        } else {
            let child = &mut self.children[i];
            child.send(&ToMailer::Hello { version: ipc::VERSION });
            child.send(&ToMailer::Configure(self.mail.settings.clone()));
            let jobs: Vec<MailJob> = self.mail.held[i - 1].values().map(|(j, _)| j.clone()).collect();
            for jobs in ipc::batches(jobs) {
                child.send(&ToMailer::Send { jobs });
            }
        }
        Ok(())
    }

    /// After a store restart: everything in flight goes again, in its original order;
    /// a request that was in flight for two deaths is answered with an error instead.
    pub(super) fn replay_store(&mut self) {
        let reqs: Vec<u64> = self.pending.keys().copied().collect();
        for req in reqs {
            let r = &self.pending[&req];
            if r.deaths >= 2 {
                let r = self.pending.remove(&req).expect("listed");
                log::warn!("store: a request was in flight for two store deaths; answering an error");
                self.fail_reply(&r.target, "the store failed twice on this command");
                if matches!(r.target, Target::Ids) {
                    self.ids_requested = false;
                    self.ask_ids();
                }
                if matches!(r.target, Target::TakeMail) {
                    self.mail.asking = false;
                }
                continue;
            }
            self.children[0].send(&r.record);
        }
    }

    pub(super) fn child_lost(&mut self, i: usize, why: &str) {
        if !self.children[i].up() {
            return;
        }
        if self.stopping.is_none() {
            log::error!("{} lost: {why}", self.children[i].name);
        }
        self.children[i].lost(self.poll.registry(), Instant::now());
        self.reap();
        if i == 0 {
            for r in self.pending.values_mut() {
                r.deaths += 1;
            }
        } else {
            self.mailer_lost(i);
        }
    }

    pub(super) fn restart_children(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        for i in 0..self.children.len() {
            if self.children[i].restart_at.is_some_and(|t| t <= now) {
                if let Err(e) = self.start_child(i) {
                    log::error!("{}: cannot fork: {e}", self.children[i].name);
                    self.children[i].restart_at = Some(now + Duration::from_secs(1));
                } else {
                    log::info!("{} restarted", self.children[i].name);
                }
            }
        }
    }

    /// Collects exited children, so none is left a zombie.
    pub(super) fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if let Some(i) = self.children.iter().position(|c| c.pid == Some(pid)) {
                        let how = match status {
                            WaitStatus::Exited(_, code) => format!("exited with status {code}"),
                            WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
                            other => format!("{other:?}"),
                        };
                        if self.stopping.is_none() {
                            log::warn!("{} (pid {pid}) {how}", self.children[i].name);
                        }
                        self.children[i].pid = None;
                        if self.children[i].up() {
                            // Noticed before its pipe said so.
                            self.child_lost(i, &how);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn flush_children(&mut self) {
        for i in 0..self.children.len() {
            if let Err(e) = self.children[i].flush() {
                self.child_lost(i, &format!("write: {e}"));
            }
        }
    }
}
