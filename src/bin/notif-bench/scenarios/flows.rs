//! fanout, latency and pairs: publishers send, subscribers count what arrives and when.

use std::time::{Duration, Instant};

use mio::Events;

use super::fmt_result;
use crate::args::Args;
use crate::event_loop::{Bench, Flow, Role, STALL};
use crate::{now_ns, Meter};

/// fanout, latency and pairs: flows of messages from publishers to subscribers.
pub fn run(a: &Args) -> Result<(), String> {
    let deadline = Instant::now() + a.timeout;
    let mut b = Bench::new(a.server, a.payload, a.tls.clone())?;
    let (nflows, subs_per_flow, total, window, rate) = match a.scenario.as_str() {
        "fanout" => (1, a.subs, a.msgs, a.window, None),
        "pairs" => (a.pairs, 1, a.msgs, a.window, None),
        _ => {
            let total = (a.rate as f64 * a.duration.as_secs_f64()) as u64;
            // Not gated by the window: the window only has to cover the stall time.
            let w = (a.rate as usize * (STALL.as_secs() as usize + 1)).max(1);
            (1, a.subs, total, w, Some(a.rate))
        }
    };
    let mut plan = Vec::new();
    for f in 0..nflows {
        let topic = if nflows == 1 { format!("bench.{}", a.scenario) } else { format!("bench.pair{f}") };
        b.flows.push(Flow::new(topic, subs_per_flow as u64, total, window));
        for _ in 0..subs_per_flow {
            plan.push((Role::Sub, f));
        }
    }
    let (ready, failed) = b.setup(a.addr, &plan, &[], deadline)?;
    if failed > 0 {
        return Err(format!("{failed} subscriber(s) failed, {ready} ready"));
    }
    let pubs: Vec<(Role, usize)> = (0..nflows).map(|f| (Role::Pub, f)).collect();
    let first_pub = b.conns.len();
    let (_, failed) = b.setup(a.addr, &pubs, &[], deadline)?;
    if failed > 0 {
        return Err(format!("{failed} publisher(s) failed"));
    }
    for f in 0..nflows {
        b.flows[f].publisher = first_pub + f;
    }
    let mut events = Events::with_capacity(1024);
    let meter = Meter::start();
    let start_ns = now_ns();
    let mut capped = false;
    loop {
        let now = now_ns();
        if rate.is_none() && !capped && meter.wall.elapsed() >= a.duration {
            // Bounded in time as well as in count: stop publishing, let the rest arrive.
            capped = true;
            for f in b.flows.iter_mut() {
                f.total = f.sent;
            }
        }
        for f in 0..b.flows.len() {
            let p = b.flows[f].publisher;
            if b.conns[p].closed {
                return Err("a publisher was disconnected".into());
            }
            match rate {
                None => {
                    while b.flows[f].can_send() {
                        b.send_one(f);
                    }
                }
                Some(r) => {
                    while b.flows[f].sent < b.flows[f].total
                        && start_ns + b.flows[f].sent * 1_000_000_000 / r <= now
                    {
                        b.send_one(f);
                    }
                }
            }
            if !b.conns[p].wbuf.is_empty() {
                b.flush(p);
            }
            b.flows[f].advance(now);
        }
        let all_sent = b.flows.iter().all(|f| f.sent == f.total);
        let finished = match rate {
            None => b.flows.iter().all(Flow::done),
            Some(_) => {
                all_sent
                    && b.flows.iter().all(|f| {
                        f.delivered >= f.total * f.subs_live
                            || now.saturating_sub(f.last_send) > STALL.as_nanos() as u64
                    })
            }
        };
        if finished {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("notif-bench: timeout; reporting what was measured");
            break;
        }
        let timeout = match rate {
            Some(r) if !all_sent => {
                let next = start_ns + b.flows[0].sent * 1_000_000_000 / r;
                Duration::from_nanos(next.saturating_sub(now_ns()))
            }
            _ => Duration::from_millis(100),
        };
        b.poll_once(&mut events, timeout)?;
    }
    // The last delivery, not the loop's end, closes the interval.
    let (secs, cpu) = meter.stop();
    let delivered: u64 = b.flows.iter().map(|f| f.delivered).sum();
    let expected: u64 = b.flows.iter().map(|f| f.sent * f.subs_start).sum();
    let sent: u64 = b.flows.iter().map(|f| f.sent).sum();
    let mut fields = vec![("scenario", a.scenario.clone()), ("server", a.server.name().into())];
    match a.scenario.as_str() {
        "pairs" => fields.push(("pairs", a.pairs.to_string())),
        _ => fields.push(("subs", a.subs.to_string())),
    }
    if rate.is_some() {
        fields.push(("rate", a.rate.to_string()));
    }
    fields.extend([
        ("sent", sent.to_string()),
        ("delivered", delivered.to_string()),
        ("lost", expected.saturating_sub(delivered).to_string()),
        ("secs", format!("{secs:.3}")),
        ("msgs_per_s", format!("{:.0}", delivered as f64 / secs)),
        ("p50_us", b.hist.quantile(0.50).to_string()),
        ("p99_us", b.hist.quantile(0.99).to_string()),
        ("max_us", b.hist.max.to_string()),
        ("errors", b.errors.to_string()),
        ("dropped", b.dropped.to_string()),
        ("gen_cpu", format!("{cpu:.2}")),
    ]);
    println!("{}", fmt_result(&fields));
    Ok(())
}
