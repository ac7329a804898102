//! The configuration file: flat TOML keys, each typed, defaulted and validated.
//!
//! Pure: no I/O but reading the file in [`Config::load`]. Every error names the file and,
//! where there is one, the line, so an operator can go straight to it.

use crate::ipc::{ConsentLimits, MailSettings, StoreSettings};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use toml_edit::{ImDocument, Item, Value};

/// The configuration file read without `-c`: `/etc/notifd.conf`, or
/// `$NOTIFD_SYSCONFDIR/notifd.conf` when that variable is set while building.
/// `make install`'s `SYSCONFDIR` does not change it: the binary is built before, and the
/// init scripts it installs name their file with `-c`.
pub fn default_path() -> PathBuf {
    Path::new(option_env!("NOTIFD_SYSCONFDIR").unwrap_or("/etc")).join("notifd.conf")
}

/// The largest `max_line`: a publication must fit, with room to spare, in one record
/// on the store's pipe ([`crate::ipc::MAX_FRAME`]).
pub const MAX_LINE_LIMIT: usize = 64 * 1024;

/// `sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync at every commit.
    Full,
    /// fsync at checkpoints only (WAL): may lose the last commits on power loss.
    Normal,
}

/// `mail_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailPolicy {
    /// Every subscribed address.
    All,
    /// Addresses with no live subscribed connection at publish time.
    Offline,
    /// Nobody.
    None,
}

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error.
    Stderr,
    /// syslog(3), facility daemon.
    Syslog,
    /// A file, reopened on SIGHUP.
    File(PathBuf),
}

/// The whole configuration, with every default filled in and relative paths resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    /// Address to listen on, given to getaddrinfo with `AI_PASSIVE`; `"::"` takes IPv4 and IPv6.
    pub host: String,
    /// TCP port; 0 lets the kernel choose (logged as `listening on ADDRESS`).
    pub port: u16,
    /// Connections held at once; one more is answered `-ERR BUSY` and closed.
    pub max_clients: u32,
    /// Connections from one address (an IPv6 /64) at once.
    pub max_clients_per_ip: u32,
    /// Longest client line in bytes, CR and LF included; at most [`MAX_LINE_LIMIT`].
    pub max_line: usize,
    /// Unsent output bytes of one connection before it is a slow consumer.
    pub max_pending: usize,
    /// Commands of one connection waiting for their replies before it is no longer read.
    pub max_inflight: u32,
    /// Distinct (event, email) live subscriptions of one connection.
    pub max_subs_per_conn: u32,
    /// Replays (`SINCE`) of untrusted connections running at once; others wait their turn.
    pub max_replays: u32,
    /// Idle seconds before TCP keepalive probes; 0: none.
    pub tcp_keepalive: u32,
    /// The `AUTH` token for `PUB` and `LIST`; empty: only loopback clients may.
    pub publish_token: String,
    /// The SQLite database file.
    pub database: PathBuf,
    /// When the store fsyncs.
    pub sync: SyncMode,
    /// Days that notifications and finished emails are kept; 0: for ever.
    pub keep_days: u32,
    /// Seconds the reactor waits for the store before `-ERR UNAVAILABLE`.
    pub store_timeout: u32,
    /// How emails are sent.
    pub mail_transport: Transport,
    /// Which subscribed addresses get an email for a publication.
    pub mail_policy: MailPolicy,
    /// The sender address of the emails.
    pub mail_from: String,
    /// The SMTP relay's host.
    pub smtp_host: String,
    /// The SMTP relay's port.
    pub smtp_port: u16,
    /// TLS towards the SMTP relay.
    pub smtp_tls: SmtpTls,
    /// SMTP AUTH user; empty: no AUTH.
    pub smtp_user: String,
    /// The file holding the SMTP AUTH password, read at start-up and on SIGHUP.
    pub smtp_password_file: Option<PathBuf>,
    /// A PEM CA certificate to trust for the relay, besides the system's.
    pub smtp_ca_file: Option<PathBuf>,
    /// The sendmail program of the `sendmail` transport.
    pub sendmail_path: PathBuf,
    /// The folder of the `spool` transport's `.eml` files.
    pub spool_dir: PathBuf,
    /// Mailer processes.
    pub mail_workers: u32,
    /// Seconds before the second try of a failed email; later delays double.
    pub mail_retry_base: u32,
    /// Tries of one email before it is given up.
    pub mail_max_tries: u32,
    /// The user to switch to when started as root; empty: stay as started.
    pub user: String,
    /// Where `-d` writes the parent's process id.
    pub pid_file: PathBuf,
    /// `None`: stderr in the foreground, syslog with `-d`.
    pub log: Option<LogTarget>,
    /// The least important messages logged.
    pub log_level: log::LevelFilter,
    /// How many `-v` the command line gave (not a key of the file): each raises
    /// `log_level` one step, at start-up and again after every reload.
    pub verbose: u8,
    /// `publish_token_file`: [`Config::load`] reads `publish_token` from its first line.
    pub publish_token_file: Option<PathBuf>,
    /// `sendmail_timeout`: seconds one sendmail run may take before it is killed.
    pub sendmail_timeout: u32,
    /// TLS port, beside the plain one on the same `host`; 0 lets the kernel choose.
    /// Used only when `tls_cert_file` is set.
    pub tls_port: u16,
    /// The server's PEM certificate chain, leaf first; `None`: no TLS port.
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `tls_cert_file`; set exactly when it is.
    pub tls_key_file: Option<PathBuf>,
    /// A PEM CA whose client certificates make a TLS client trusted.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Whether the plain-text port is open; false needs `tls_cert_file`.
    pub plain: bool,
    /// `idle_timeout`: seconds without a command after which a connection that holds no
    /// live subscription is closed; 0: never.
    pub idle_timeout: u32,
    /// `max_clients_per_net`: connections from one network (IPv4 /24, IPv6 /48) at once.
    pub max_clients_per_net: u32,
    /// `max_pending_total`: unsent bytes of all connections together before the largest
    /// are dropped as slow consumers.
    pub max_pending_total: usize,
    /// `auth_fail_limit`: failed AUTHs per client address (IPv6 /64) per minute before
    /// further ones are refused unchecked.
    pub auth_fail_limit: u32,
    /// Address of the HTTP side (pages, `/metrics`, `/health`), resolved like `host`;
    /// empty: no HTTP listener.
    pub http_host: String,
    /// The HTTP port; 0 lets the kernel choose (logged as `http listening on ADDRESS`).
    pub http_port: u16,
    /// HTTP connections held at once; one more is answered 503 and closed.
    pub http_max_clients: u32,
    /// `confirm`: untrusted SUBs store pending pairs that the owner must confirm.
    pub confirm: bool,
    /// `confirm_interval`, `confirm_days`, `confirm_domain_rate`, `confirm_rate`,
    /// `max_unconfirmed_per_email`, `max_unconfirmed`.
    pub consent: ConsentLimits,
    /// `public_url`: the base of the links in emails; empty for no links.
    pub public_url: String,
    /// The port the listener got (not a key of the file; 0 until bound): what emails
    /// name when `port` is 0.
    pub bound_port: u16,
    /// `sub_rate`: SUB and UNSUB per minute from one untrusted client address (IPv6
    /// /64); ten times that per network (IPv4 /24, IPv6 /48).
    pub sub_rate: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            file: None,
            host: "::".into(),
            port: 7600,
            max_clients: 10_000,
            max_clients_per_ip: 256,
            max_line: 4096,
            max_pending: 1 << 20,
            max_inflight: 64,
            max_subs_per_conn: 1000,
            max_replays: 16,
            tcp_keepalive: 60,
            publish_token: String::new(),
            database: "/var/lib/notifd/notifd.db".into(),
            sync: SyncMode::Full,
            keep_days: 30,
            store_timeout: 5,
            mail_transport: Transport::Spool,
            mail_policy: MailPolicy::All,
            mail_from: "notifd@localhost".into(),
            smtp_host: "localhost".into(),
            smtp_port: 25,
            smtp_tls: SmtpTls::None,
            smtp_user: String::new(),
            smtp_password_file: None,
            smtp_ca_file: None,
            sendmail_path: "/usr/sbin/sendmail".into(),
            spool_dir: "/var/spool/notifd".into(),
            mail_workers: 1,
            mail_retry_base: 30,
            mail_max_tries: 10,
            user: String::new(),
            pid_file: "/run/notifd/notifd.pid".into(),
            log: None,
            log_level: log::LevelFilter::Info,
            verbose: 0,
            publish_token_file: None,
            sendmail_timeout: 60,
            tls_port: 7643,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            plain: true,
            idle_timeout: 300,
            max_clients_per_net: 1024,
            max_pending_total: 256 << 20,
            auth_fail_limit: 10,
            http_host: String::new(),
            http_port: 7680,
            http_max_clients: 256,
            confirm: true,
            consent: ConsentLimits::default(),
            public_url: String::new(),
            bound_port: 0,
            sub_rate: 60,
        }
    }
}

/// A configuration that cannot be used: `FILE line N: what`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The line, 1-based, when the error has one.
    pub line: Option<usize>,
    /// What is wrong, naming the key.
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {}: {}", self.file, line, self.msg),
            None => write!(f, "{}: {}", self.file, self.msg),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and parses `path`. A missing file is an error unless `missing_ok`
    /// (the default path), in which case the built-in defaults are used.
    pub fn load(path: &Path, missing_ok: bool) -> Result<Config, ConfigError> {
        let err = |msg: String| ConfigError { file: path.display().to_string(), line: None, msg };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let base = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                let base =
                    std::path::absolute(&base).map_err(|e| err(format!("cannot resolve folder: {e}")))?;
                let mut cfg = Config::parse(&text, &path.display().to_string(), &base)?;
                cfg.file = Some(path.to_path_buf());
                if let Some(token_file) = &cfg.publish_token_file {
                    cfg.publish_token = read_token(token_file).map_err(err)?;
                }
                Ok(cfg)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing_ok => Ok(Config::default()),
            Err(e) => Err(err(format!("cannot read: {e}"))),
        }
    }

    /// Parses configuration text; `name` is used in errors, relative paths are resolved
    /// against `base`.
    pub fn parse(text: &str, name: &str, base: &Path) -> Result<Config, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let doc = ImDocument::parse(text).map_err(|e| {
            let line = e.span().map(|s| line_of(s.start));
            // TOML's own words for `host = 127.0.0.1` ("expected newline") do not say
            // what is wrong, so the likely mistake is named first.
            let msg = line
                .and_then(|n| text.lines().nth(n - 1))
                .and_then(|l| unquoted_string(l, base))
                .unwrap_or_else(|| match e.message().trim() {
                    // toml_edit has no message for some errors (a lone CR).
                    "" => "invalid TOML".into(),
                    m => m.replace('\n', " "),
                });
            ConfigError { file: name.into(), line, msg }
        })?;
        let mut cfg = Config::default();
        for (key, item) in doc.as_table().iter() {
            let (k, _) = doc.as_table().get_key_value(key).expect("key from iteration");
            let line = k.span().map(|s| line_of(s.start));
            let fail = |msg: String| ConfigError { file: name.into(), line, msg };
            let Item::Value(value) = item else {
                return Err(fail(format!("\"{key}\": tables are not used; every key is flat")));
            };
            cfg.set(key, value, base).map_err(fail)?;
        }
        cfg.check().map_err(|(key, msg)| {
            let line = doc.as_table().key(key).and_then(|k| k.span()).map(|s| line_of(s.start));
            ConfigError { file: name.into(), line, msg }
        })?;
        Ok(cfg)
    }

    fn set(&mut self, key: &str, v: &Value, base: &Path) -> Result<(), String> {
        let path = |v: &Value| -> Result<PathBuf, String> {
            let s = string(key, v)?;
            if s.is_empty() {
                return Err(format!("\"{key}\" must not be empty"));
            }
            Ok(base.join(s))
        };
        let opt_path = |v: &Value| -> Result<Option<PathBuf>, String> {
            let s = string(key, v)?;
            Ok(if s.is_empty() { None } else { Some(base.join(s)) })
        };
        match key {
            "host" => self.host = string(key, v)?,
            "port" => self.port = int(key, v, 0, 65535)? as u16,
            "max_clients" => self.max_clients = int(key, v, 1, 10_000_000)? as u32,
            "max_clients_per_ip" => self.max_clients_per_ip = int(key, v, 1, 10_000_000)? as u32,
            "max_line" => self.max_line = int(key, v, 64, MAX_LINE_LIMIT as i64)? as usize,
            "max_pending" => self.max_pending = int(key, v, 1024, 1 << 30)? as usize,
            "max_inflight" => self.max_inflight = int(key, v, 1, 65536)? as u32,
            "max_subs_per_conn" => self.max_subs_per_conn = int(key, v, 1, 1_000_000)? as u32,
            "max_replays" => self.max_replays = int(key, v, 1, 1_000_000)? as u32,
            "tcp_keepalive" => self.tcp_keepalive = int(key, v, 0, 86_400)? as u32,
            "publish_token" => self.publish_token = string(key, v)?,
            "database" => self.database = path(v)?,
            "sync" => {
                self.sync = match string(key, v)?.as_str() {
                    "full" => SyncMode::Full,
                    "normal" => SyncMode::Normal,
                    other => return Err(one_of(key, other, "\"full\" or \"normal\"")),
                }
            }
            "keep_days" => self.keep_days = int(key, v, 0, 36_500)? as u32,
            "store_timeout" => self.store_timeout = int(key, v, 1, 3600)? as u32,
            "mail_transport" => {
                self.mail_transport = match string(key, v)?.as_str() {
                    "smtp" => Transport::Smtp,
                    "sendmail" => Transport::Sendmail,
                    "spool" => Transport::Spool,
                    "none" => Transport::None,
                    other => return Err(one_of(key, other, "\"smtp\", \"sendmail\", \"spool\" or \"none\"")),
                }
            }
            "mail_policy" => {
                self.mail_policy = match string(key, v)?.as_str() {
                    "all" => MailPolicy::All,
                    "offline" => MailPolicy::Offline,
                    "none" => MailPolicy::None,
                    other => return Err(one_of(key, other, "\"all\", \"offline\" or \"none\"")),
                }
            }
            "mail_from" => self.mail_from = string(key, v)?,
            "smtp_host" => self.smtp_host = string(key, v)?,
            "smtp_port" => self.smtp_port = int(key, v, 1, 65535)? as u16,
            "smtp_tls" => {
                self.smtp_tls = match string(key, v)?.as_str() {
                    "none" => SmtpTls::None,
                    "starttls" => SmtpTls::Starttls,
                    "tls" => SmtpTls::Tls,
                    other => return Err(one_of(key, other, "\"none\", \"starttls\" or \"tls\"")),
                }
            }
            "smtp_user" => self.smtp_user = string(key, v)?,
            "smtp_password_file" => self.smtp_password_file = opt_path(v)?,
            "smtp_ca_file" => self.smtp_ca_file = opt_path(v)?,
            "sendmail_path" => self.sendmail_path = path(v)?,
            "spool_dir" => self.spool_dir = path(v)?,
            "mail_workers" => self.mail_workers = int(key, v, 1, 64)? as u32,
            "mail_retry_base" => self.mail_retry_base = int(key, v, 1, 86_400)? as u32,
            "mail_max_tries" => self.mail_max_tries = int(key, v, 1, 1000)? as u32,
            "user" => self.user = string(key, v)?,
            "pid_file" => self.pid_file = path(v)?,
            "log" => {
                self.log = Some(match string(key, v)?.as_str() {
                    "stderr" => LogTarget::Stderr,
                    "syslog" => LogTarget::Syslog,
                    "" => return Err("\"log\" must not be empty".into()),
                    file => LogTarget::File(base.join(file)),
                })
            }
            "log_level" => {
                self.log_level = match string(key, v)?.as_str() {
                    "error" => log::LevelFilter::Error,
                    "warn" => log::LevelFilter::Warn,
                    "info" => log::LevelFilter::Info,
                    "debug" => log::LevelFilter::Debug,
                    "trace" => log::LevelFilter::Trace,
                    other => return Err(one_of(key, other, "error, warn, info, debug or trace")),
                }
            }
            "publish_token_file" => self.publish_token_file = opt_path(v)?,
            "sendmail_timeout" => self.sendmail_timeout = int(key, v, 1, 86_400)? as u32,
            "tls_port" => self.tls_port = int(key, v, 0, 65535)? as u16,
            "tls_cert_file" => self.tls_cert_file = opt_path(v)?,
            "tls_key_file" => self.tls_key_file = opt_path(v)?,
            "tls_client_ca_file" => self.tls_client_ca_file = opt_path(v)?,
            "plain" => self.plain = boolean(key, v)?,
            "idle_timeout" => self.idle_timeout = int(key, v, 0, 86_400)? as u32,
            "max_clients_per_net" => self.max_clients_per_net = int(key, v, 1, 10_000_000)? as u32,
            "max_pending_total" => self.max_pending_total = int(key, v, 1024, 1 << 40)? as usize,
            "auth_fail_limit" => self.auth_fail_limit = int(key, v, 1, 1_000_000)? as u32,
            "http_host" => self.http_host = string(key, v)?,
            "http_port" => self.http_port = int(key, v, 0, 65535)? as u16,
            "http_max_clients" => self.http_max_clients = int(key, v, 1, 1_000_000)? as u32,
            "confirm" => {
                self.confirm = v.as_bool().ok_or_else(|| format!("\"{key}\" must be true or false"))?
            }
            "confirm_interval" => self.consent.confirm_interval = int(key, v, 1, 30 * 86_400)? as u32,
            "confirm_days" => self.consent.confirm_days = int(key, v, 1, 365)? as u32,
            "confirm_domain_rate" => self.consent.confirm_domain_rate = int(key, v, 0, 1_000_000)? as u32,
            "confirm_rate" => self.consent.confirm_rate = int(key, v, 0, 10_000_000)? as u32,
            "max_unconfirmed_per_email" => {
                self.consent.max_unconfirmed_per_email = int(key, v, 1, 1_000_000)? as u32
            }
            "max_unconfirmed" => self.consent.max_unconfirmed = int(key, v, 0, 1 << 40)? as u64,
            "public_url" => self.public_url = public_url(key, &string(key, v)?)?,
            "sub_rate" => self.sub_rate = int(key, v, 1, 100_000_000)? as u32,
            _ => return Err(unknown_key(key)),
        }
        Ok(())
    }

    /// Checks that span keys; returns the key to blame and the message.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.host.is_empty() {
            return Err(("host", "\"host\" must not be empty".into()));
        }
        if crate::protocol::valid_email(self.mail_from.as_bytes()).is_none() {
            return Err((
                "mail_from",
                format!("\"mail_from\" is not a valid address: \"{}\"", self.mail_from),
            ));
        }
        if self.publish_token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err((
                "publish_token",
                "\"publish_token\" must not contain spaces or control characters".into(),
            ));
        }
        if self.smtp_password_file.is_some() && self.smtp_user.is_empty() {
            return Err(("smtp_password_file", "\"smtp_password_file\" needs \"smtp_user\"".into()));
        }
        if self.smtp_host.is_empty() {
            return Err(("smtp_host", "\"smtp_host\" must not be empty".into()));
        }
        if !self.publish_token.is_empty() && self.publish_token_file.is_some() {
            return Err((
                "publish_token_file",
                "\"publish_token_file\" and \"publish_token\" are both set; keep one".into(),
            ));
        }
        if !self.smtp_user.is_empty() && self.smtp_tls == SmtpTls::None && !is_loopback_host(&self.smtp_host)
        {
            return Err((
                "smtp_user",
                format!(
                    "\"smtp_user\" with smtp_tls = \"none\" would send the password in the clear to \"{}\"; \
                     use \"starttls\" or \"tls\"",
                    self.smtp_host
                ),
            ));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(("tls_cert_file", "\"tls_cert_file\" needs \"tls_key_file\"".into()))
            }
            (None, Some(_)) => {
                return Err(("tls_key_file", "\"tls_key_file\" needs \"tls_cert_file\"".into()))
            }
            _ => {}
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(("tls_client_ca_file", "\"tls_client_ca_file\" needs \"tls_cert_file\"".into()));
        }
        if self.plain && self.tls_cert_file.is_some() && self.tls_port == self.port && self.port != 0 {
            // Their defaults differ, so whichever is not at its default is in the file.
            let key = if self.tls_port == Config::default().tls_port { "port" } else { "tls_port" };
            return Err((key, format!("\"tls_port\" must differ from \"port\" ({})", self.port)));
        }
        if !self.plain && self.tls_cert_file.is_none() {
            return Err((
                "plain",
                "\"plain = false\" needs \"tls_cert_file\": there would be no port to listen on".into(),
            ));
        }
        if !self.public_url.is_empty() && self.http_host.is_empty() {
            // Every link in the emails would lead nowhere.
            return Err((
                "public_url",
                "\"public_url\" needs \"http_host\": nothing would serve the links in the emails".into(),
            ));
        }
        Ok(())
    }
}

/// Every key [`Config::set`] takes, for the suggestion on an unknown one.
const KEYS: &[&str] = &[
    "host",
    "port",
    "max_clients",
    "max_clients_per_ip",
    "max_line",
    "max_pending",
    "max_inflight",
    "max_subs_per_conn",
    "max_replays",
    "tcp_keepalive",
    "publish_token",
    "database",
    "sync",
    "keep_days",
    "store_timeout",
    "mail_transport",
    "mail_policy",
    "mail_from",
    "smtp_host",
    "smtp_port",
    "smtp_tls",
    "smtp_user",
    "smtp_password_file",
    "smtp_ca_file",
    "sendmail_path",
    "spool_dir",
    "mail_workers",
    "mail_retry_base",
    "mail_max_tries",
    "user",
    "pid_file",
    "log",
    "log_level",
    "publish_token_file",
    "sendmail_timeout",
    "tls_port",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "plain",
    "idle_timeout",
    "max_clients_per_net",
    "max_pending_total",
    "auth_fail_limit",
    "http_host",
    "http_port",
    "http_max_clients",
    "confirm",
    "confirm_interval",
    "confirm_days",
    "confirm_domain_rate",
    "confirm_rate",
    "max_unconfirmed_per_email",
    "max_unconfirmed",
    "public_url",
    "sub_rate",
];

fn unknown_key(key: &str) -> String {
    match nearest_key(key) {
        Some(known) => format!("unknown key \"{key}\" (did you mean \"{known}\"?)"),
        None => format!("unknown key \"{key}\""),
    }
}

/// The known key at most two edits from `key`, the nearest first; none when the
/// edits would replace all of `key`.
fn nearest_key(key: &str) -> Option<&'static str> {
    let len = key.chars().count();
    KEYS.iter()
        .map(|known| (edit_distance(key, known), *known))
        .filter(|&(d, _)| d <= 2 && d < len)
        .min_by_key(|&(d, _)| d)
        .map(|(_, known)| known)
}

/// Levenshtein distance in characters, where swapping two neighbours also counts one
/// edit (`max_clinets` is one edit from `max_clients`).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // Three rows of the table: two rows back are needed for a swap.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (prev[j] + 1).min(row[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        before = std::mem::replace(&mut prev, row);
    }
    prev[b.len()]
}

/// For a line TOML refuses, such as `host = 127.0.0.1`: when its key takes a string and
/// the value would do once quoted, the message that says so.
fn unquoted_string(line: &str, base: &Path) -> Option<String> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    // Unquoted, a `#` would start a comment, as it does after a quoted value.
    let value = value.split('#').next()?.trim();
    let bare = |k: &str| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if value.is_empty() || value.starts_with(['"', '\'']) || !bare(key) {
        return None;
    }
    if !KEYS.contains(&key) {
        return Some(unknown_key(key));
    }
    // Rust's quoting is TOML's for what a value may hold; anything else fails to parse.
    let quoted = format!("{key} = {value:?}");
    let doc = ImDocument::parse(quoted.as_str()).ok()?;
    let item = doc.as_table().get(key)?.as_value()?;
    match Config::default().set(key, item, base) {
        // Quotes would not help a number (`port = 76OO`).
        Err(msg) if msg.ends_with(", not string") => None,
        _ => Some(format!("\"{key}\" takes a string, and strings need double quotes: {quoted}")),
    }
}

/// The first line of `publish_token_file`, held to the rules of `publish_token`.
fn read_token(path: &Path) -> Result<String, String> {
    let what = |msg: &str| format!("publish_token_file {}: {msg}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| what(&format!("cannot read: {e}")))?;
    let token = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if token.is_empty() {
        return Err(what("the first line is empty"));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(what("the token must not contain spaces or control characters"));
    }
    Ok(token.to_string())
}

/// `localhost`, a name under `.localhost` (RFC 6761) or a loopback address: a host
/// whose traffic never leaves this machine. No name is resolved.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
    let lower = host.to_ascii_lowercase();
    lower == "localhost"
        || lower.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Tokens shorter than this draw a warning: guessable by a patient stranger.
pub const SHORT_TOKEN: usize = 16;

impl Config {
    /// What is allowed but probably a mistake, one sentence each, for `-t` and the
    /// start-up log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let token_len = self.publish_token.chars().count();
        if token_len > 0 && token_len < SHORT_TOKEN {
            out.push(format!(
                "publish_token is {token_len} characters long; use at least {SHORT_TOKEN} random ones"
            ));
        }
        let from_domain = self.mail_from.rsplit('@').next().unwrap_or("").trim_end_matches('>');
        if self.mail_transport == Transport::Smtp
            && is_loopback_host(from_domain)
            && !is_loopback_host(&self.smtp_host)
        {
            out.push(format!(
                "mail_from \"{}\" is at localhost while mail goes to {}; replies and bounces cannot reach it",
                self.mail_from, self.smtp_host
            ));
        }
        out
    }
}

fn string(key: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.value().clone()),
        other => Err(format!("\"{key}\" must be a string, not {}", other.type_name())),
    }
}

/// A `public_url`: empty, or an `http://` or `https://` URL with a host and nothing a
/// link or a header could be broken by (spaces, quotes, angle brackets, control
/// characters).
fn public_url(key: &str, url: &str) -> Result<String, String> {
    if url.is_empty() {
        return Ok(String::new());
    }
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    let Some(rest) = rest else {
        return Err(format!("\"{key}\" must start with https:// or http://, not \"{url}\""));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("\"{key}\" has no host: \"{url}\""));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b)) || url.contains(['?', '#'])
    {
        return Err(format!(
            "\"{key}\" must be a plain URL (no spaces, quotes, query or fragment): \"{url}\""
        ));
    }
    Ok(url.to_string())
}

fn int(key: &str, v: &Value, min: i64, max: i64) -> Result<i64, String> {
    match v {
        Value::Integer(i) if (min..=max).contains(i.value()) => Ok(*i.value()),
        Value::Integer(i) => Err(format!("\"{key}\" must be from {min} to {max}, not {}", i.value())),
        other => Err(format!("\"{key}\" must be an integer, not {}", other.type_name())),
    }
}

fn boolean(key: &str, v: &Value) -> Result<bool, String> {
    match v {
        Value::Boolean(b) => Ok(*b.value()),
        other => Err(format!("\"{key}\" must be true or false, not {}", other.type_name())),
    }
}

fn one_of(key: &str, got: &str, allowed: &str) -> String {
    format!("\"{key}\" must be {allowed}, not \"{got}\"")
}

impl Config {
    /// Raises `log_level` by `verbose` steps (the command line's `-v`), and keeps the
    /// count so that a reload, which rereads `log_level` from the file, can do it again.
    pub fn raise_level(&mut self, verbose: u8) {
        self.verbose = verbose;
        for _ in 0..verbose {
            self.log_level = match self.log_level {
                log::LevelFilter::Off | log::LevelFilter::Error => log::LevelFilter::Warn,
                log::LevelFilter::Warn => log::LevelFilter::Info,
                log::LevelFilter::Info => log::LevelFilter::Debug,
                _ => log::LevelFilter::Trace,
            };
        }
    }

    /// Store settings from the configuration.
    pub fn store_settings(&self) -> StoreSettings {
        StoreSettings {
            sync_full: self.sync == SyncMode::Full,
            keep_days: self.keep_days,
            mail_retry_base: self.mail_retry_base,
            mail_max_tries: self.mail_max_tries,
            // Shorter than store_timeout, so a locked database is answered with an error
            // before the client gives up on us.
            busy_timeout_ms: (self.store_timeout * 1000 / 2).max(100),
            confirm_mail: self.mail_transport != Transport::None,
            consent: self.consent.clone(),
        }
    }

    /// The server as the reader of an email reaches it, `host:port`, for the UNSUB,
    /// CONFIRM and OPTOUT instructions: the host of `public_url` when it is set, else
    /// `host` unless it is a wildcard, else this machine's name.
    pub fn server_name(&self) -> String {
        let from_url = self
            .public_url
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
            .map(|authority| authority.rsplit_once('@').map_or(authority, |(_, h)| h))
            .map(|hostport| match hostport.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or("").to_string(),
                None => hostport.split(':').next().unwrap_or("").to_string(),
            })
            .filter(|h| !h.is_empty());
        let host = from_url.unwrap_or_else(|| match self.host.as_str() {
            "" | "::" | "0.0.0.0" => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
            h => h.to_string(),
        });
        let port = if self.bound_port != 0 { self.bound_port } else { self.port };
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    /// Mail settings from the configuration, with the secret files read now.
    pub fn mail_settings(&self) -> Result<MailSettings, String> {
        let smtp_password = match &self.smtp_password_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("smtp_password_file {}: {e}", p.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            None => String::new(),
        };
        let smtp_ca_pem = match &self.smtp_ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| format!("smtp_ca_file {}: {e}", p.display()))?),
            None => None,
        };
        Ok(MailSettings {
            transport: self.mail_transport,
            from: self.mail_from.clone(),
            smtp_host: self.smtp_host.clone(),
            smtp_port: self.smtp_port,
            smtp_tls: self.smtp_tls,
            smtp_user: self.smtp_user.clone(),
            smtp_password,
            smtp_ca_pem,
            sendmail_path: self.sendmail_path.display().to_string(),
            spool_dir: self.spool_dir.display().to_string(),
            sendmail_timeout: self.sendmail_timeout,
            public_url: self.public_url.trim_end_matches('/').to_string(),
            server: self.server_name(),
        })
    }
}

/// `mail_transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// An SMTP relay.
    Smtp,
    /// The local sendmail program.
    Sendmail,
    /// `.eml` files in a folder.
    Spool,
    /// No email at all.
    None,
}

/// `smtp_tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SmtpTls {
    /// Plain text.
    None,
    /// STARTTLS, required.
    Starttls,
    /// TLS from the first byte.
    Tls,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.conf", Path::new("/etc/notifd"))
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(parse("# only a comment\n\n").unwrap(), Config::default());
    }

    #[test]
    fn every_key_sets_its_value() {
        let c = parse(
            r#"
host = "127.0.0.1"
port = 0
max_clients = 5
max_clients_per_ip = 2
max_line = 100
max_pending = 2048
max_inflight = 3
max_subs_per_conn = 4
tcp_keepalive = 0
publish_token = "s3cret"
database = "db/notifd.db"
sync = "normal"
keep_days = 0
store_timeout = 30
mail_transport = "smtp"
mail_policy = "offline"
mail_from = "me@Example.org"
smtp_host = "mx"
smtp_port = 2525
smtp_tls = "starttls"
smtp_user = "u"
smtp_password_file = "/secret"
smtp_ca_file = "ca.pem"
sendmail_path = "/bin/sendmail"
spool_dir = "spool"
mail_workers = 4
mail_retry_base = 2
mail_max_tries = 3
user = "_notifd"
pid_file = "notifd.pid"
log = "notifd.log"
log_level = "debug"
"#,
        )
        .unwrap();
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 0);
        assert_eq!((c.max_clients, c.max_clients_per_ip, c.max_line, c.max_pending), (5, 2, 100, 2048));
        assert_eq!((c.max_inflight, c.max_subs_per_conn, c.tcp_keepalive), (3, 4, 0));
        assert_eq!(c.publish_token, "s3cret");
        assert_eq!(c.database, Path::new("/etc/notifd/db/notifd.db"));
        assert_eq!(c.sync, SyncMode::Normal);
        assert_eq!((c.keep_days, c.store_timeout), (0, 30));
        assert_eq!(c.mail_transport, Transport::Smtp);
        assert_eq!(c.mail_policy, MailPolicy::Offline);
        assert_eq!(c.mail_from, "me@Example.org");
        assert_eq!((c.smtp_host.as_str(), c.smtp_port, c.smtp_tls), ("mx", 2525, SmtpTls::Starttls));
        assert_eq!(c.smtp_user, "u");
        assert_eq!(c.smtp_password_file.as_deref(), Some(Path::new("/secret")));
        assert_eq!(c.smtp_ca_file.as_deref(), Some(Path::new("/etc/notifd/ca.pem")));
        assert_eq!(c.sendmail_path, Path::new("/bin/sendmail"));
        assert_eq!(c.spool_dir, Path::new("/etc/notifd/spool"));
        assert_eq!((c.mail_workers, c.mail_retry_base, c.mail_max_tries), (4, 2, 3));
        assert_eq!(c.user, "_notifd");
        assert_eq!(c.pid_file, Path::new("/etc/notifd/notifd.pid"));
        assert_eq!(c.log, Some(LogTarget::File("/etc/notifd/notifd.log".into())));
        assert_eq!(c.log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        assert_eq!(
            error("port = 1\n\n# x\nprot = 7600\n"),
            "test.conf line 4: unknown key \"prot\" (did you mean \"port\"?)"
        );
    }

    #[test]
    fn unknown_key_suggests_the_nearest_known_one() {
        assert_eq!(
            error("max_clinets = 5"),
            "test.conf line 1: unknown key \"max_clinets\" (did you mean \"max_clients\"?)"
        );
        assert!(error("mail_worker = 2").ends_with("(did you mean \"mail_workers\"?)"));
        assert!(error("smtp_hots = \"mx\"").ends_with("(did you mean \"smtp_host\"?)"));
        assert!(error("lg = \"syslog\"").ends_with("(did you mean \"log\"?)"));
        // Nothing near: no guess.
        assert_eq!(error("colour = 1"), "test.conf line 1: unknown key \"colour\"");
        assert_eq!(error("x = 1"), "test.conf line 1: unknown key \"x\"");
        // An unknown key with an unquoted value is named as unknown, not as TOML's error.
        assert_eq!(
            error("hots = localhost"),
            "test.conf line 1: unknown key \"hots\" (did you mean \"host\"?)"
        );
    }

    #[test]
    fn edit_distance_counts_a_swap_as_one() {
        assert_eq!(edit_distance("max_clinets", "max_clients"), 1);
        assert_eq!(edit_distance("prot", "port"), 1);
        assert_eq!(edit_distance("", "log"), 3);
        assert_eq!(edit_distance("log", "log"), 0);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("pört", "port"), 1);
    }

    #[test]
    fn keys_are_the_ones_set_takes_and_the_example_names() {
        for key in KEYS {
            if let Err(err) = Config::default().set(key, &Value::from(true), Path::new("/")) {
                assert!(!err.starts_with("unknown key"), "{key}: {err}");
            }
        }
        let example = include_str!("../notifd.conf.example");
        for line in example.lines() {
            let Some((key, _)) = line.trim_start_matches('#').split_once(" = ") else { continue };
            if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                assert!(KEYS.contains(&key), "{key} is in notifd.conf.example but not in KEYS");
            }
        }
    }

    #[test]
    fn consent_keys() {
        let d = Config::default();
        assert!(d.confirm);
        // The documented defaults (OPERATIONS.md).
        let want = ConsentLimits {
            confirm_interval: 3600,
            confirm_days: 7,
            confirm_domain_rate: 60,
            confirm_rate: 1000,
            max_unconfirmed_per_email: 100,
            max_unconfirmed: 1_000_000,
        };
        assert_eq!(d.consent, want);
        assert_eq!(d.public_url, "");
        let c = parse(
            "confirm = false\nconfirm_interval = 60\nconfirm_days = 2\nconfirm_domain_rate = 5\n\
             confirm_rate = 50\nmax_unconfirmed_per_email = 3\nmax_unconfirmed = 10\n\
             public_url = \"https://notify.example.com/n/\"\nhttp_host = \"::1\"\nport = 7601\n",
        )
        .unwrap();
        assert!(!c.confirm);
        let want = ConsentLimits {
            confirm_interval: 60,
            confirm_days: 2,
            confirm_domain_rate: 5,
            confirm_rate: 50,
            max_unconfirmed_per_email: 3,
            max_unconfirmed: 10,
        };
        assert_eq!(c.consent, want);
        assert_eq!(c.server_name(), "notify.example.com:7601");
        let m = c.mail_settings().unwrap();
        assert_eq!(
            (m.public_url.as_str(), m.server.as_str()),
            ("https://notify.example.com/n", "notify.example.com:7601")
        );
        let url = "public_url = \"http://[::1]:8080\"\nhttp_host = \"::1\"";
        assert_eq!(parse(url).unwrap().server_name(), "[::1]:7600");
        assert_eq!(parse("host = \"192.0.2.7\"").unwrap().server_name(), "192.0.2.7:7600");
        assert!(error("confirm = 1").contains("\"confirm\" must be true or false"));
        assert!(error("confirm_days = 0").contains("\"confirm_days\" must be from 1"));
        for bad in
            ["ftp://x", "https://", "https:///x", "https://a b", "https://x/<y>", "https://x/?a=1", "x.org"]
        {
            let e = error(&format!("public_url = \"{bad}\""));
            assert!(e.contains("public_url"), "{bad}: {e}");
        }
    }

    #[test]
    fn unquoted_strings_are_said_to_need_quotes() {
        assert_eq!(
            error("port = 1\nhost = 127.0.0.1\n"),
            "test.conf line 2: \"host\" takes a string, and strings need double quotes: host = \"127.0.0.1\""
        );
        assert_eq!(
            error("database = /var/lib/notifd/notifd.db # here"),
            "test.conf line 1: \"database\" takes a string, and strings need double quotes: \
             database = \"/var/lib/notifd/notifd.db\""
        );
        assert!(error("host = ::").ends_with("host = \"::\""));
        assert!(error("sync = normal").ends_with("sync = \"normal\""));
        // Quotes would not make a number of it: TOML's own message stays.
        let e = error("port = 76OO");
        assert!(e.starts_with("test.conf line 1: ") && !e.contains("quotes"), "{e}");
        // An empty value is not a string left unquoted.
        assert!(!error("host = ").contains("quotes"));
    }

    #[test]
    fn wrong_type_names_the_key() {
        assert_eq!(error("port = \"7600\""), "test.conf line 1: \"port\" must be an integer, not string");
        assert_eq!(error("\nhost = 1"), "test.conf line 2: \"host\" must be a string, not integer");
        assert_eq!(error("sync = true"), "test.conf line 1: \"sync\" must be a string, not boolean");
    }

    #[test]
    fn impossible_values_are_refused() {
        assert_eq!(error("port = 70000"), "test.conf line 1: \"port\" must be from 0 to 65535, not 70000");
        assert_eq!(
            error("max_clients = 0"),
            "test.conf line 1: \"max_clients\" must be from 1 to 10000000, not 0"
        );
        assert_eq!(
            error("sync = \"fast\""),
            "test.conf line 1: \"sync\" must be \"full\" or \"normal\", not \"fast\""
        );
        assert!(error("mail_transport = \"pigeon\"").contains("\"mail_transport\" must be"));
        assert!(error("log_level = \"loud\"").contains("\"log_level\" must be"));
        assert!(error("database = \"\"").contains("\"database\" must not be empty"));
    }

    #[test]
    fn checks_across_keys_point_at_the_key() {
        assert_eq!(
            error("port = 1\nmail_from = \"not an address\"\n"),
            "test.conf line 2: \"mail_from\" is not a valid address: \"not an address\""
        );
        assert!(error("\n\npublish_token = \"a b\"").starts_with("test.conf line 3: \"publish_token\""));
        assert!(error("smtp_password_file = \"/p\"").contains("needs \"smtp_user\""));
        assert_eq!(
            error("port = 1\npublic_url = \"https://n.example.com\"\n"),
            "test.conf line 2: \"public_url\" needs \"http_host\": nothing would serve the links in the emails"
        );
        assert!(parse("public_url = \"https://n.example.com\"\nhttp_host = \"127.0.0.1\"\n").is_ok());
    }

    #[test]
    fn syntax_errors_and_tables_have_a_line() {
        let e = parse("port = 1\nhost = \n").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("test.conf", Some(2)));
        assert_eq!(
            error("[server]\nport = 1\n"),
            "test.conf line 1: \"server\": tables are not used; every key is flat"
        );
        assert!(parse("port = 1\nport = 2\n").is_err());
    }

    /// Found by the config_text fuzz target: toml_edit has no message for a lone CR.
    #[test]
    fn a_syntax_error_always_says_something() {
        let e = parse("\r").unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(!e.msg.trim().is_empty(), "{e:?}");
    }

    #[test]
    fn missing_default_file_is_defaults_and_missing_named_file_is_an_error() {
        let p = Path::new("/nonexistent/notifd.conf");
        assert_eq!(Config::load(p, true).unwrap(), Config::default());
        let e = Config::load(p, false).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/notifd.conf: cannot read"), "{e}");
    }

    #[test]
    fn new_keys_and_their_rules() {
        let c = parse("publish_token_file = \"token\"\nsendmail_timeout = 5\n").unwrap();
        assert_eq!(c.publish_token_file.as_deref(), Some(Path::new("/etc/notifd/token")));
        assert_eq!(c.sendmail_timeout, 5);
        assert_eq!(Config::default().sendmail_timeout, 60);
        assert!(error("sendmail_timeout = 0").contains("\"sendmail_timeout\" must be from 1"));
        assert_eq!(
            error("publish_token = \"abcdefghijklmnopq\"\npublish_token_file = \"t\"\n"),
            "test.conf line 2: \"publish_token_file\" and \"publish_token\" are both set; keep one"
        );
        let cleartext = error("smtp_host = \"mx.example.org\"\n\nsmtp_user = \"u\"\n");
        assert!(
            cleartext.starts_with("test.conf line 3: \"smtp_user\" with smtp_tls = \"none\""),
            "{cleartext}"
        );
        for host in ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "mail.localhost"] {
            assert!(parse(&format!("smtp_host = {host:?}\nsmtp_user = \"u\"")).is_ok(), "{host}");
        }
        assert!(parse("smtp_host = \"mx.example.org\"\nsmtp_user = \"u\"\nsmtp_tls = \"tls\"").is_ok());
    }

    #[test]
    fn connection_limit_keys() {
        let d = Config::default();
        assert_eq!((d.idle_timeout, d.max_clients_per_net), (300, 1024));
        assert_eq!((d.max_pending_total, d.auth_fail_limit), (268_435_456, 10));
        let c = parse(
            "idle_timeout = 0\nmax_clients_per_net = 3\nmax_pending_total = 8192\nauth_fail_limit = 2\n",
        )
        .unwrap();
        assert_eq!((c.idle_timeout, c.max_clients_per_net), (0, 3));
        assert_eq!((c.max_pending_total, c.auth_fail_limit), (8192, 2));
        assert!(error("idle_timeout = -1").contains("\"idle_timeout\" must be from 0 to 86400"));
        assert!(error("max_clients_per_net = 0").contains("\"max_clients_per_net\" must be from 1"));
        assert!(error("max_pending_total = 100").contains("\"max_pending_total\" must be from 1024"));
        assert!(error("auth_fail_limit = 0").contains("\"auth_fail_limit\" must be from 1"));
        assert_eq!(d.sub_rate, 60);
        assert_eq!(parse("sub_rate = 5\n").unwrap().sub_rate, 5);
        assert!(error("sub_rate = 0").contains("\"sub_rate\" must be from 1"));
    }

    #[test]
    fn token_file_is_read_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("notifd.conf");
        std::fs::write(&conf, "publish_token_file = \"token\"\n").unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdefXYZ\r\nsecond line\n").unwrap();
        assert_eq!(Config::load(&conf, false).unwrap().publish_token, "0123456789abcdefXYZ");
        std::fs::write(&token, "\nlater\n").unwrap();
        assert!(Config::load(&conf, false).unwrap_err().to_string().contains("the first line is empty"));
        std::fs::write(&token, "").unwrap();
        assert!(Config::load(&conf, false).unwrap_err().to_string().contains("the first line is empty"));
        std::fs::write(&token, "a b\n").unwrap();
        assert!(Config::load(&conf, false).is_err());
        std::fs::remove_file(&token).unwrap();
        let e = Config::load(&conf, false).unwrap_err().to_string();
        assert!(e.contains("publish_token_file") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn warnings_for_short_tokens_and_a_localhost_sender() {
        assert!(Config::default().warnings().is_empty());
        let short = parse("publish_token = \"short\"").unwrap().warnings();
        assert!(short.len() == 1 && short[0].contains("publish_token is 5 characters"), "{short:?}");
        assert!(parse("publish_token = \"0123456789abcdef\"").unwrap().warnings().is_empty());
        let far = parse("mail_transport = \"smtp\"\nsmtp_host = \"mx.example.org\"").unwrap().warnings();
        assert!(far.len() == 1 && far[0].contains("mail_from"), "{far:?}");
        assert!(parse("mail_transport = \"smtp\"").unwrap().warnings().is_empty());
    }

    #[test]
    fn tls_keys_set_their_values() {
        let c = parse("").unwrap();
        assert_eq!((c.tls_port, c.plain), (7643, true));
        assert_eq!((c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file), (None, None, None));
        let c = parse(
            r#"
tls_port = 0
tls_cert_file = "tls/chain.pem"
tls_key_file = "/etc/ssl/private/notifd.key"
tls_client_ca_file = "clients.pem"
plain = false
"#,
        )
        .unwrap();
        assert_eq!((c.tls_port, c.plain), (0, false));
        assert_eq!(c.tls_cert_file.as_deref(), Some(Path::new("/etc/notifd/tls/chain.pem")));
        assert_eq!(c.tls_key_file.as_deref(), Some(Path::new("/etc/ssl/private/notifd.key")));
        assert_eq!(c.tls_client_ca_file.as_deref(), Some(Path::new("/etc/notifd/clients.pem")));
        // Empty is unset, as for the other optional files.
        let c = parse("tls_cert_file = \"\"\ntls_key_file = \"\"\n").unwrap();
        assert_eq!((c.tls_cert_file, c.tls_key_file), (None, None));
    }

    #[test]
    fn tls_keys_are_checked_together() {
        assert_eq!(
            error("port = 1\ntls_key_file = \"k.pem\"\n"),
            "test.conf line 2: \"tls_key_file\" needs \"tls_cert_file\""
        );
        assert_eq!(
            error("\n\ntls_cert_file = \"c.pem\"\n"),
            "test.conf line 3: \"tls_cert_file\" needs \"tls_key_file\""
        );
        assert_eq!(
            error("tls_client_ca_file = \"ca.pem\""),
            "test.conf line 1: \"tls_client_ca_file\" needs \"tls_cert_file\""
        );
        assert_eq!(
            error("port = 1\nplain = false\n"),
            "test.conf line 2: \"plain = false\" needs \"tls_cert_file\": there would be no port to listen on"
        );
        assert!(parse("plain = false\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n").is_ok());
        let both = "tls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n";
        assert_eq!(
            error(&format!("{both}port = 7643\n")),
            "test.conf line 3: \"tls_port\" must differ from \"port\" (7643)"
        );
        assert_eq!(
            error(&format!("{both}tls_port = 7600\n")),
            "test.conf line 3: \"tls_port\" must differ from \"port\" (7600)"
        );
        // The same port is no clash when only one of them is open, or both are 0.
        assert!(parse(&format!("{both}port = 7643\nplain = false\n")).is_ok());
        assert!(parse(&format!("{both}port = 0\ntls_port = 0\n")).is_ok());
        assert!(parse("port = 7643\n").is_ok());
        assert_eq!(error("plain = \"no\""), "test.conf line 1: \"plain\" must be true or false, not string");
        assert_eq!(
            error("tls_port = 65536"),
            "test.conf line 1: \"tls_port\" must be from 0 to 65535, not 65536"
        );
        assert!(error("tls_prot = 1").ends_with("(did you mean \"tls_port\"?)"));
    }

    #[test]
    fn http_keys() {
        let d = Config::default();
        assert_eq!((d.http_host.as_str(), d.http_port, d.http_max_clients), ("", 7680, 256));
        let c = parse("http_host = \"::\"\nhttp_port = 0\nhttp_max_clients = 3\n").unwrap();
        assert_eq!((c.http_host.as_str(), c.http_port, c.http_max_clients), ("::", 0, 3));
        assert!(error("http_max_clients = 0").contains("\"http_max_clients\" must be from 1"));
        assert!(error("http_port = 70000").contains("\"http_port\""));
        assert!(error("http_prot = 1").ends_with("(did you mean \"http_port\"?)"));
    }
}
