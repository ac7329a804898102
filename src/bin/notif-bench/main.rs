//! notif-bench: the load generator behind `make bench`.
//!
//! One thread, one mio event loop, many non-blocking connections. It speaks notifd's
//! line protocol and, for comparison, Redis pub/sub (RESP), NATS's text protocol and
//! MQTT 3.1.1 at QoS 0, so that one program with one set of costs measures every server.
//! It only ever connects to loopback addresses, and every loop is bounded in count and
//! in time. Results are printed as `RESULT key=value ...` lines for bench/run.sh.
//!
//! Latency: each published payload carries its send time in nanoseconds of a monotonic
//! clock that the publishers and subscribers share (they are in this one process).
//!
//! Self-contained on purpose: it does not use the notifd library crate.
//!
//! Where things are: `args` (the command line), `wire` (one codec per server), `histogram`
//! (latencies), `event_loop` (connections, flows of messages, the mio loop) and
//! `scenarios` (one file per measurement, each printing its `RESULT` line).

mod args;
mod event_loop;
mod histogram;
mod scenarios;
mod tls;
mod wire;

use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the first call, on the monotonic clock that every payload carries.
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn main() -> ExitCode {
    let args = match args::parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("notif-bench: {e}\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    now_ns();
    raise_nofile();
    let r = match args.scenario.as_str() {
        "fanout" | "latency" | "pairs" => scenarios::flows::run(&args),
        "conns" => scenarios::conns::run(&args),
        "durable" => scenarios::durable::run(&args),
        "sqlite" => scenarios::sqlite::run(&args),
        "replay" => scenarios::replay::run(&args),
        "replay-fill" => scenarios::replay::fill(&args),
        other => Err(format!("unknown scenario {other:?}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("notif-bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// Lifts the soft open-files limit to the hard one: the connection scenario needs it.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wall time and CPU time of a measured interval; `cpu` is the fraction of one core.
struct Meter {
    wall: Instant,
    cpu: f64,
}

impl Meter {
    fn start() -> Meter {
        Meter { wall: Instant::now(), cpu: cpu_seconds() }
    }
    fn stop(&self) -> (f64, f64) {
        let secs = self.wall.elapsed().as_secs_f64().max(1e-9);
        (secs, (cpu_seconds() - self.cpu) / secs)
    }
}
