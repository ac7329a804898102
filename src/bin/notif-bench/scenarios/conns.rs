//! conns: many idle subscribed connections, and the server's memory before and after.

use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use mio::Events;

use super::fmt_result;
use crate::args::Args;
use crate::event_loop::{Bench, Role};
use crate::Meter;

/// 127.0.0.1 to 127.0.0.n: each source address has its own range of client ports.
fn sources(n: usize) -> Vec<IpAddr> {
    (0..n).map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, (k + 1) as u8))).collect()
}

/// VmRSS in KiB of `pid` and all its descendants.
fn tree_rss_kb(pid: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so parse after ')'.
            let Some(after) = stat.rfind(')').map(|k| &stat[k + 1..]) else {
                continue;
            };
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut total = 0;
    let mut todo = vec![pid];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > 100_000 {
            break;
        }
        if let Ok(status) = fs::read_to_string(format!("/proc/{p}/status")) {
            for l in status.lines() {
                if let Some(v) = l.strip_prefix("VmRSS:") {
                    total += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        if let Some(c) = children.get(&p) {
            todo.extend(c);
        }
    }
    total
}

pub fn run(a: &Args) -> Result<(), String> {
    let pid = a.pid.ok_or("conns needs --pid of the server")?;
    let deadline = Instant::now() + a.timeout;
    let mut b = Bench::new(a.server, a.payload, a.tls.clone())?;
    // About 20,000 ephemeral ports per source address keeps clear of the range's end.
    let nsrc = if a.sources > 0 { a.sources } else { (a.conns / 20_000 + 1).max(4) }.min(254);
    let before = tree_rss_kb(pid);
    let meter = Meter::start();
    let plan = vec![(Role::Idle, 0); a.conns];
    let (ready, failed) = b.setup(a.addr, &plan, &sources(nsrc), deadline)?;
    let (connect_secs, cpu) = meter.stop();
    // Idle means idle: only answer the server's keep-alive pings meanwhile.
    let mut events = Events::with_capacity(1024);
    let settle_end = Instant::now() + a.settle;
    while Instant::now() < settle_end {
        b.poll_once(&mut events, Duration::from_millis(200))?;
    }
    let still = b.conns.iter().filter(|c| c.ready && !c.closed).count();
    let after = tree_rss_kb(pid);
    let per_conn = if still > 0 { (after.saturating_sub(before) * 1024) as f64 / still as f64 } else { 0.0 };
    println!(
        "{}",
        fmt_result(&[
            ("scenario", "conns".into()),
            ("server", a.server.name().into()),
            ("conns", a.conns.to_string()),
            ("ready", ready.to_string()),
            ("failed", failed.to_string()),
            ("open_after_settle", still.to_string()),
            ("sources", nsrc.to_string()),
            ("rss_before_kb", before.to_string()),
            ("rss_after_kb", after.to_string()),
            ("bytes_per_conn", format!("{per_conn:.0}")),
            ("connect_secs", format!("{connect_secs:.2}")),
            ("gen_cpu", format!("{cpu:.2}")),
        ])
    );
    Ok(())
}
