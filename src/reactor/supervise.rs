//! Forking, losing and restarting the children, and reaping them.

use super::child_link::Child;
use super::store_link::Target;
use super::{Reactor, Source};
use crate::ipc::{self, Filled, FromMailer, FromStore, MailJob, ToMailer, ToStore};
use mio::Registry;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io;
use std::time::{Duration, Instant};

/// Which child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChildId {
    /// The store.
    Store,
    /// Index into the reactor's mailers.
    Mailer(usize),
}

/// Why a record from a child stops the reading of its pipe.
pub(super) enum Fault {
    /// The child is broken (it broke the pipe contract): it is lost, then restarted.
    Broken(String),
    /// It speaks another record version: the daemon cannot go on.
    Version(String),
}

impl Reactor {
    /// Start-up only (it blocks): waits until the store has said hello, so that `-d`
    /// and init scripts report a database that cannot be opened instead of a daemon
    /// that answers every command with UNAVAILABLE.
    pub fn wait_store(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut events = mio::Events::with_capacity(64);
        while !self.store.child.greeted {
            if let Some(why) = self.fatal.take() {
                return Err(why);
            }
            if !self.store.child.up() {
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
            for ev in events.iter() {
                match Source::of(ev.token()) {
                    // Clients wait until the store is up: accepted below.
                    Source::Listener | Source::TlsListener => {}
                    source => self.dispatch(source, ev.is_readable(), ev.is_writable()),
                }
            }
            self.flush_children();
        }
        if let Some(why) = self.fatal.take() {
            return Err(why);
        }
        // The listeners are edge-triggered: take what came while we waited.
        self.accept(false);
        self.accept(true);
        Ok(())
    }

    /// Every child, the store first.
    pub(super) fn child_ids(&self) -> impl Iterator<Item = ChildId> {
        std::iter::once(ChildId::Store).chain((0..self.mailers.len()).map(ChildId::Mailer))
    }

    pub(super) fn child(&mut self, id: ChildId) -> &mut Child {
        match id {
            ChildId::Store => &mut self.store.child,
            ChildId::Mailer(i) => &mut self.mailers[i].child,
        }
    }

    /// The child, and the registry its pipes are registered with.
    fn child_and_registry(&mut self, id: ChildId) -> (&mut Child, &Registry) {
        let child = match id {
            ChildId::Store => &mut self.store.child,
            ChildId::Mailer(i) => &mut self.mailers[i].child,
        };
        (child, self.poll.registry())
    }

    fn child_by_pid(&self, pid: Pid) -> Option<ChildId> {
        if self.store.child.pid == Some(pid) {
            return Some(ChildId::Store);
        }
        self.mailers.iter().position(|m| m.child.pid == Some(pid)).map(ChildId::Mailer)
    }

    /// Reads what the child sent and dispatches each whole record.
    pub(super) fn child_readable(&mut self, id: ChildId) {
        let filled = match self.child(id).read() {
            Ok(filled) => filled,
            Err(e) => return self.child_lost(id, &format!("read: {e}")),
        };
        loop {
            let res = match id {
                ChildId::Store => {
                    self.store.child.next_frame::<FromStore>().map(|m| m.map(|m| self.dispatch_store(m)))
                }
                ChildId::Mailer(i) => self.mailers[i]
                    .child
                    .next_frame::<FromMailer>()
                    .map(|m| m.map(|m| self.dispatch_mailer(i, m))),
            };
            match res {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(Fault::Broken(why)))) => return self.child_lost(id, &why),
                Ok(Some(Err(Fault::Version(why)))) => {
                    self.fatal = Some(why);
                    return;
                }
                Ok(None) => break,
                Err(e) => return self.child_lost(id, &format!("broken record: {e}")),
            }
        }
        match filled {
            Filled::Eof => self.child_lost(id, "pipe closed"),
            // Come back next turn: edge-triggered, and the budget stopped us early.
            Filled::Budget => self.resume_child.push(id),
            Filled::Drained => {}
        }
    }

    /// A child's `Hello`: the record versions must match.
    pub(super) fn hello(&mut self, id: ChildId, version: u32) -> Result<(), Fault> {
        let child = self.child(id);
        if version != ipc::VERSION {
            return Err(Fault::Version(format!(
                "{} speaks record version {version}, this reactor {}",
                child.name,
                ipc::VERSION
            )));
        }
        child.greeted = true;
        Ok(())
    }

    /// Forks the child and sends it what it needs first.
    pub(super) fn start_child(&mut self, id: ChildId) -> io::Result<()> {
        let spawned = match id {
            ChildId::Store => {
                let db = self.cfg.database.clone();
                let settings = self.store.settings.clone();
                crate::spawn::spawn("notifd-store", "store", move |input, output| {
                    crate::store::run(&db, settings, input, output)
                })?
            }
            ChildId::Mailer(_) => crate::spawn::spawn("notifd-mailer", "mailer", crate::mailer::run)?,
        };
        let pid = spawned.pid;
        let (child, registry) = self.child_and_registry(id);
        child.attach(spawned, registry)?;
        log::info!("{} started (pid {pid})", child.name);
        match id {
            ChildId::Store => {
                self.store.child.send(&ToStore::Hello { version: ipc::VERSION });
                self.replay_store();
            }
            ChildId::Mailer(i) => {
                let m = &mut self.mailers[i];
                m.child.send(&ToMailer::Hello { version: ipc::VERSION });
                m.child.send(&ToMailer::Configure(self.mail.settings.clone()));
                let jobs: Vec<MailJob> = m.held.values().map(|(j, _)| j.clone()).collect();
                for jobs in ipc::batches(jobs) {
                    m.child.send(&ToMailer::Send { jobs });
                }
            }
        }
        Ok(())
    }

    /// After a store restart: everything in flight goes again, in its original order;
    /// a request that was in flight for two deaths is answered with an error instead.
    fn replay_store(&mut self) {
        let reqs: Vec<u64> = self.store.pending.keys().copied().collect();
        for req in reqs {
            let Some(r) = self.store.pending.get(&req) else { continue };
            if r.deaths < 2 {
                self.store.child.send(&r.record);
                self.restart_list(req);
                continue;
            }
            let Some(r) = self.store.pending.remove(&req) else { continue };
            log::warn!("store: a request was in flight for two store deaths; answering an error");
            self.fail_reply(&r.target, "the store failed twice on this command");
            match r.target {
                Target::Ids => {
                    self.store.ids.requested = false;
                    self.ask_ids();
                }
                Target::TakeMail => self.mail.asking = false,
                Target::Reply { .. }
                | Target::Orphan
                | Target::MailDone
                | Target::Http { .. }
                | Target::Replay { .. } => {}
            }
        }
    }

    /// A LIST the lost store answered in part starts over: the new store sends every
    /// row again, so the rows gathered so far and their count are dropped.
    fn restart_list(&mut self, req: u64) {
        let Some(r) = self.store.pending.get_mut(&req) else { return };
        let Target::Reply { listed, .. } = &mut r.target else { return };
        *listed = 0;
        if let Some((key, seq)) = self.reply_slot(&self.store.pending[&req].target) {
            if let Some(slot) = self.clients.conns[key].slot(seq) {
                slot.data = Vec::new();
            }
        }
    }

    /// The child died or broke its pipe: forget its pipes, schedule its restart, and
    /// take care of what it held.
    pub(super) fn child_lost(&mut self, id: ChildId, why: &str) {
        if !self.child(id).up() {
            return;
        }
        if self.stopping.is_none() {
            log::error!("{} lost: {why}", self.child(id).name);
        }
        let (child, registry) = self.child_and_registry(id);
        child.lost(registry, Instant::now());
        self.reap();
        match id {
            ChildId::Store => {
                for r in self.store.pending.values_mut() {
                    r.deaths += 1;
                }
            }
            ChildId::Mailer(i) => self.mailer_lost(i),
        }
    }

    /// Forks again the children whose restart is due.
    pub(super) fn restart_children(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        for id in self.child_ids() {
            if self.child(id).restart_at.is_some_and(|t| t <= now) {
                if let Err(e) = self.start_child(id) {
                    let child = self.child(id);
                    log::error!("{}: cannot fork: {e}", child.name);
                    child.restart_at = Some(now + Duration::from_secs(1));
                } else {
                    log::info!("{} restarted", self.child(id).name);
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
                    let Some(id) = self.child_by_pid(pid) else { continue };
                    let how = match status {
                        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
                        WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
                        other => format!("{other:?}"),
                    };
                    let stopping = self.stopping.is_some();
                    let child = self.child(id);
                    if !stopping {
                        log::warn!("{} (pid {pid}) {how}", child.name);
                    }
                    child.pid = None;
                    if child.up() {
                        // Noticed before its pipe said so.
                        self.child_lost(id, &how);
                    }
                }
            }
        }
    }

    /// Writes what the child's pipe takes.
    pub(super) fn flush_child(&mut self, id: ChildId) {
        if let Err(e) = self.child(id).flush() {
            self.child_lost(id, &format!("write: {e}"));
        }
    }

    /// Writes what every child's pipe takes.
    pub(super) fn flush_children(&mut self) {
        for id in self.child_ids() {
            self.flush_child(id);
        }
    }
}
