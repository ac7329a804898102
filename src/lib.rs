//! notifd: a live-notification daemon. See ARCHITECTURE.md in the README for the map.

pub mod config;
pub mod ipc;
pub mod listen;
pub mod logger;
pub mod mail;
pub mod protocol;
pub mod store;
