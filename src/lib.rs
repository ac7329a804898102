//! notifd: a live-notification daemon. See ARCHITECTURE.md in the README for the map.

pub mod ipc;
pub mod mail;
