//! notifd: a live-notification daemon. README.md is the map; notifd-protocol(7) is the
//! wire protocol, notifd(8) the daemon and notifd.conf(5) its configuration.
//!
//! Three processes: the [`reactor`] is the parent, [`store`] and [`mailer`] are its
//! children, and [`ipc`] is the records between them.
//!
//! - [`config`]: the configuration file, parsed and checked, with every default.
//! - [`consent`]: codes and link tokens (HMACs with the server secret), mailbox form.
//! - [`daemon`]: start-up as a daemon: detaching, the pid file, dropping privileges.
//! - [`ipc`]: the records on the pipes between the reactor and its children, and their
//!   framing.
//! - [`listen`]: resolving and binding the listening socket, and the descriptor limit.
//! - [`logger`]: the `log` backend of all three processes: stderr, syslog or a file.
//! - [`mailer`]: the mailer process, the only one that sends email.
//! - [`protocol`]: the client wire format: parsing lines, encoding replies (pure).
//! - [`reactor`]: the parent process: one event loop over clients and children.
//! - [`spawn`]: forking a child that holds only its own two pipe ends.
//! - [`store`]: the store process, the only one that opens the database.
//! - [`transport`]: sending one email over SMTP, sendmail or a spool folder.

#![warn(missing_docs)]

pub mod config;
pub mod consent;
pub mod daemon;
pub mod http;
pub mod ipc;
pub mod listen;
pub mod logger;
pub mod mailer;
pub mod protocol;
pub mod reactor;
pub mod spawn;
pub mod store;
pub mod tls;
pub mod transport;
