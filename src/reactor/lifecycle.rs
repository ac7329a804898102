//! Signals: reloading the configuration (SIGHUP) and stopping gracefully (SIGTERM, SIGINT).

use super::conn::State;
use super::store_link::Target;
use super::Reactor;
use crate::config::{Config, Transport};
use crate::ipc::{LogSettings, ToMailer, ToStore};
use crate::protocol::{self, Code};
use mio::Events;
use nix::sys::wait::waitpid;
use std::time::{Duration, Instant};

/// How long a stopping server gives slow clients to take their last bytes.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

impl Reactor {
    /// SIGHUP: reopens the log and rereads the configuration file.
    pub(super) fn reload(&mut self) {
        // For logrotate: the file is reopened whether or not the configuration loads.
        if let Err(e) = crate::logger::reopen() {
            log::error!("reload: cannot reopen the log: {e}");
        }
        let Some(file) = self.cfg.file.clone() else {
            log::info!("reload: no configuration file; nothing to reread");
            return;
        };
        let new = match Config::load(&file, false) {
            // The port the listener holds, for the emails, stays across reloads.
            Ok(c) => Config { bound_port: self.cfg.bound_port, ..c },
            Err(e) => {
                log::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        let mut mail = match new.mail_settings() {
            Ok(m) => m,
            Err(e) => {
                log::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        // [tls] The new certificate serves new connections; open ones keep theirs.
        let tls_config = match crate::tls::from_config(&new) {
            Ok(t) => t,
            Err(e) => {
                log::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        let mut new = new;
        new.raise_level(self.cfg.verbose);
        crate::listen::fit_max_clients(&mut new);
        let old = std::mem::replace(&mut self.cfg, new);
        let changed = changed_keys(&old, &self.cfg);
        let restart_only = [
            "host",
            "port",
            "database",
            "user",
            "pid_file",
            "mail_workers",
            "http_host",
            "http_port",
            "tls_port",
            "plain",
        ];
        for key in restart_only {
            if changed.contains(&key) {
                log::warn!("reload: \"{key}\" changed; it takes effect at the next restart");
            }
        }
        // Keys that only a restart applies keep their running values.
        self.cfg.host = old.host.clone();
        self.cfg.port = old.port;
        self.cfg.database = old.database.clone();
        self.cfg.user = old.user.clone();
        self.cfg.pid_file = old.pid_file.clone();
        self.cfg.mail_workers = old.mail_workers;
        self.cfg.http_host = old.http_host.clone();
        self.cfg.http_port = old.http_port;
        self.cfg.tls_port = old.tls_port;
        self.cfg.plain = old.plain;
        match tls_config {
            Some(config) if self.tls.listener.is_some() => self.set_tls_config(config),
            _ if self.tls.listener.is_some() || self.cfg.tls_cert_file.is_some() => {
                // Opening or closing the TLS port needs a restart; the running files stay.
                log::warn!("reload: setting or removing \"tls_cert_file\" takes effect at the next restart");
                self.cfg.tls_cert_file = old.tls_cert_file.clone();
                self.cfg.tls_key_file = old.tls_key_file.clone();
                self.cfg.tls_client_ca_file = old.tls_client_ca_file.clone();
            }
            _ => {}
        }
        if (old.mail_transport == Transport::None) != (self.cfg.mail_transport == Transport::None) {
            log::warn!("reload: turning mail_transport on or off takes effect at the next restart");
            self.cfg.mail_transport = old.mail_transport;
            mail.transport = old.mail_transport;
        }
        if self.cfg.publish_token != old.publish_token {
            // Connections that authenticated with the old token must AUTH again.
            self.token_gen += 1;
        }
        let target = crate::daemon::log_target(&self.cfg);
        if let Err(e) = crate::logger::configure(&target, self.cfg.log_level) {
            log::error!("reload: cannot open the log: {e}");
        }
        let logging = LogSettings { target, level: self.cfg.log_level };
        self.store.settings = self.cfg.store_settings();
        self.store.child.send(&ToStore::Configure(self.store.settings.clone()));
        self.store.child.send(&ToStore::Logging(logging.clone()));
        self.mail.settings = mail;
        for m in &mut self.mailers {
            m.child.send(&ToMailer::Configure(self.mail.settings.clone()));
            m.child.send(&ToMailer::Logging(logging.clone()));
        }
        if changed.is_empty() {
            log::info!("configuration reloaded: nothing changed");
        } else {
            log::info!("configuration reloaded: changed {}", changed.join(", "));
        }
    }

    /// SIGTERM or SIGINT: stops accepting and reading commands; what was read is
    /// finished and answered.
    pub(super) fn begin_stop(&mut self) {
        log::info!("stopping: finishing commands in flight");
        self.stopping = Some(Instant::now());
        if let Some(mut l) = self.acceptor.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some(mut l) = self.tls.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        // Stop reading commands; what was read is finished and answered.
        for (key, c) in self.clients.conns.iter_mut() {
            if c.state == State::Open {
                c.state = State::Stopping;
                c.inbuf = Vec::new();
                if !c.dirty {
                    c.dirty = true;
                    self.clients.dirty.push(key);
                }
            }
        }
        // Mailers first: what they did not report is sent again after the restart.
        for m in &mut self.mailers {
            m.child.close_input(self.poll.registry());
        }
    }

    /// One step of the stop; returns the exit status once done.
    pub(super) fn stop_step(&mut self, since: Instant) -> Option<i32> {
        let waiting = self.clients.conns.iter().any(|(_, c)| !c.slots.is_empty());
        let store_busy =
            self.store.pending.values().any(|r| matches!(r.target, Target::MailDone | Target::Reply { .. }));
        let limit = Duration::from_secs(self.cfg.store_timeout.into()) + Duration::from_millis(500);
        if (waiting || store_busy) && since.elapsed() < limit && self.store.child.up() {
            return None;
        }
        // Every reply is out (or the wait is over): say goodbye.
        let keys: Vec<usize> = self.clients.conns.iter().map(|(k, _)| k).collect();
        for &key in &keys {
            let c = &mut self.clients.conns[key];
            for slot in c.slots.iter_mut().filter(|s| !s.done) {
                slot.data.clear();
                protocol::err(
                    &mut slot.data,
                    Code::Unavailable,
                    "the server stopped before the database confirmed",
                );
                slot.done = true;
            }
            c.drain_slots();
            if c.state == State::Stopping {
                protocol::err(&mut c.out, Code::Busy, "shutting down");
            }
            // [tls] Inside TLS, then close_notify.
            c.close_notify();
            let _ = c.flush(&[]);
        }
        let linger_until = Instant::now() + SHUTDOWN_LINGER;
        while Instant::now() < linger_until && self.clients.conns.iter().any(|(_, c)| c.unsent() > 0) {
            // Bounded: slow clients get SHUTDOWN_LINGER to take their last bytes.
            let mut events = Events::with_capacity(256);
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(20)));
            for (_, c) in self.clients.conns.iter_mut() {
                if c.unsent() > 0 {
                    let _ = c.flush(&[]);
                }
            }
        }
        for key in keys {
            let mut c = self.clients.conns.remove(key);
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
            let _ = self.poll.registry().deregister(&mut c.sock);
        }
        self.store.child.close_input(self.poll.registry());
        self.wait_children();
        log::info!("stopped");
        Some(0)
    }

    /// Waits (bounded) for every child to exit, then kills what is left.
    fn wait_children(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.reap();
            let mailers = self.mailers.iter().map(|m| &m.child);
            let alive: Vec<nix::unistd::Pid> =
                std::iter::once(&self.store.child).chain(mailers).filter_map(|c| c.pid).collect();
            if alive.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for pid in alive {
                    log::warn!("child {pid} did not exit; killing it");
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The names of the keys whose values differ.
fn changed_keys(a: &Config, b: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    macro_rules! cmp {
        ($($k:ident),*) => { $( if a.$k != b.$k { out.push(stringify!($k)); } )* };
    }
    cmp!(
        host,
        port,
        max_clients,
        max_clients_per_ip,
        max_line,
        max_pending,
        max_inflight,
        max_subs_per_conn,
        max_replays,
        tcp_keepalive,
        publish_token,
        publish_token_file,
        database,
        sync,
        keep_days,
        store_timeout,
        mail_transport,
        mail_policy,
        mail_from,
        smtp_host,
        smtp_port,
        smtp_tls,
        smtp_user,
        smtp_password_file,
        smtp_ca_file,
        sendmail_path,
        sendmail_timeout,
        spool_dir,
        mail_workers,
        mail_retry_base,
        tls_port,
        tls_cert_file,
        tls_key_file,
        tls_client_ca_file,
        plain,
        mail_max_tries,
        user,
        pid_file,
        log,
        log_level,
        idle_timeout,
        max_clients_per_net,
        max_pending_total,
        auth_fail_limit,
        http_host,
        http_port,
        http_max_clients,
        confirm,
        public_url
    );
    macro_rules! cmp_consent {
        ($($k:ident),*) => { $( if a.consent.$k != b.consent.$k { out.push(stringify!($k)); } )* };
    }
    cmp_consent!(
        confirm_interval,
        confirm_days,
        confirm_domain_rate,
        confirm_rate,
        max_unconfirmed_per_email,
        max_unconfirmed
    );
    out
}
