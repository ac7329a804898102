//! notifd: a live-notification daemon. README.md and ARCHITECTURE.md are the map:
//! [`reactor`] is the parent process, [`store`] and [`mailer`] its children, [`ipc`] the
//! records between them, [`protocol`] the client wire format.

pub mod config;
pub mod daemon;
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
