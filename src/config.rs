//! The configuration file: flat TOML keys, each typed, defaulted and validated.
//!
//! Pure: no I/O but reading the file in [`Config::load`]. Every error names the file and,
//! where there is one, the line, so an operator can go straight to it.

use crate::ipc::{MailSettings, StoreSettings};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use toml_edit::{ImDocument, Item, Value};

/// The default configuration file, under `make install`'s layout (`SYSCONFDIR` at build time).
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
    pub host: String,
    pub port: u16,
    pub max_clients: u32,
    pub max_clients_per_ip: u32,
    pub max_line: usize,
    pub max_pending: usize,
    pub max_inflight: u32,
    pub max_subs_per_conn: u32,
    pub tcp_keepalive: u32,
    pub publish_token: String,
    pub database: PathBuf,
    pub sync: SyncMode,
    pub keep_days: u32,
    pub store_timeout: u32,
    pub mail_transport: Transport,
    pub mail_policy: MailPolicy,
    pub mail_from: String,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_tls: SmtpTls,
    pub smtp_user: String,
    pub smtp_password_file: Option<PathBuf>,
    pub smtp_ca_file: Option<PathBuf>,
    pub sendmail_path: PathBuf,
    pub spool_dir: PathBuf,
    pub mail_workers: u32,
    pub mail_retry_base: u32,
    pub mail_max_tries: u32,
    pub user: String,
    pub pid_file: PathBuf,
    /// `None`: stderr in the foreground, syslog with `-d`.
    pub log: Option<LogTarget>,
    pub log_level: log::LevelFilter,
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
        let doc = ImDocument::parse(text).map_err(|e| ConfigError {
            file: name.into(),
            line: e.span().map(|s| line_of(s.start)),
            // toml_edit has no message for some errors (a lone CR).
            msg: match e.message().trim() {
                "" => "invalid TOML".into(),
                m => m.replace('\n', " "),
            },
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
            _ => return Err(format!("unknown key \"{key}\"")),
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
        Ok(())
    }
}

fn string(key: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.value().clone()),
        other => Err(format!("\"{key}\" must be a string, not {}", other.type_name())),
    }
}

fn int(key: &str, v: &Value, min: i64, max: i64) -> Result<i64, String> {
    match v {
        Value::Integer(i) if (min..=max).contains(i.value()) => Ok(*i.value()),
        Value::Integer(i) => Err(format!("\"{key}\" must be from {min} to {max}, not {}", i.value())),
        other => Err(format!("\"{key}\" must be an integer, not {}", other.type_name())),
    }
}

fn one_of(key: &str, got: &str, allowed: &str) -> String {
    format!("\"{key}\" must be {allowed}, not \"{got}\"")
}

impl Config {
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
        assert_eq!((c.smtp_host.as_str(), c.smtp_port, c.smtp_tls), ("mx", 2525, SmtpTls::Starttls));
        assert_eq!(c.smtp_password_file.as_deref(), Some(Path::new("/secret")));
        assert_eq!(c.smtp_ca_file.as_deref(), Some(Path::new("/etc/notifd/ca.pem")));
        assert_eq!(c.spool_dir, Path::new("/etc/notifd/spool"));
        assert_eq!((c.mail_workers, c.mail_retry_base, c.mail_max_tries), (4, 2, 3));
        assert_eq!(c.user, "_notifd");
        assert_eq!(c.pid_file, Path::new("/etc/notifd/notifd.pid"));
        assert_eq!(c.log, Some(LogTarget::File("/etc/notifd/notifd.log".into())));
        assert_eq!(c.log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        assert_eq!(error("port = 1\n\n# x\nprot = 7600\n"), "test.conf line 4: unknown key \"prot\"");
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
}
