//! durable: pipelined SUB or PUB commands that notifd must commit before it answers.

use std::io::Write;
use std::time::{Duration, Instant};

use mio::Events;

use super::fmt_result;
use crate::args::Args;
use crate::event_loop::{Bench, Role};
use crate::wire::{make_payload, Server};
use crate::{now_ns, Meter};

pub fn run(a: &Args) -> Result<(), String> {
    if a.server != Server::Notifd {
        return Err("durable is a notifd scenario".into());
    }
    let deadline = Instant::now() + a.timeout;
    let mut b = Bench::new(a.server, a.payload, a.tls.clone())?;
    let plan = vec![(Role::Writer, 0); a.conns];
    let (_, failed) = b.setup(a.addr, &plan, &[], deadline)?;
    if failed > 0 {
        return Err(format!("{failed} connection(s) failed"));
    }
    let run = std::process::id();
    let mut events = Events::with_capacity(1024);
    let meter = Meter::start();
    let stop_at = Instant::now() + a.duration;
    let mut line = Vec::with_capacity(128);
    loop {
        let issuing = Instant::now() < stop_at;
        let mut outstanding = 0;
        for i in 0..b.conns.len() {
            if b.conns[i].closed {
                continue;
            }
            while issuing && b.conns[i].pending.len() < a.inflight {
                let c = &mut b.conns[i];
                let n = c.sent;
                c.sent += 1;
                line.clear();
                if a.kind == "sub" {
                    let _ = write!(line, "SUB bench.durable r{run}c{i}n{n}@bench.example\r\n");
                } else {
                    make_payload(&mut b.payload, n, a.payload);
                    line.extend_from_slice(b"PUB bench.durable ");
                    line.extend_from_slice(&b.payload);
                    line.extend_from_slice(b"\r\n");
                }
                c.wbuf.extend_from_slice(&line);
                c.pending.push_back(now_ns());
            }
            if !b.conns[i].wbuf.is_empty() {
                b.flush(i);
            }
            outstanding += b.conns[i].pending.len();
        }
        if !issuing && outstanding == 0 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("notif-bench: timeout with {outstanding} commands unanswered");
            break;
        }
        b.poll_once(&mut events, Duration::from_millis(20))?;
    }
    let (secs, cpu) = meter.stop();
    println!(
        "{}",
        fmt_result(&[
            ("scenario", "durable".into()),
            ("server", "notifd".into()),
            ("kind", a.kind.clone()),
            ("conns", a.conns.to_string()),
            ("inflight", a.inflight.to_string()),
            ("acked", b.acked.to_string()),
            ("errors", b.errors.to_string()),
            ("secs", format!("{secs:.3}")),
            ("acked_per_s", format!("{:.0}", b.acked as f64 / secs)),
            ("p50_us", b.hist.quantile(0.50).to_string()),
            ("p99_us", b.hist.quantile(0.99).to_string()),
            ("dropped", b.dropped.to_string()),
            ("gen_cpu", format!("{cpu:.2}")),
        ])
    );
    Ok(())
}
