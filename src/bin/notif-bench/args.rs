//! The command line: `--key value` pairs into `Args`, checked before anything connects.

use std::env;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::wire::Server;

/// Printed for `--help` and after a usage error.
pub const USAGE: &str = "usage: notif-bench --scenario NAME [options]
scenarios:
  fanout    1 publisher -> --subs subscribers, at most --msgs messages or --duration
            seconds of publishing, --window messages in flight end to end
  latency   --rate publications/s to --subs subscribers for --duration seconds
  pairs     --pairs publishers each to its own subscriber, as fanout otherwise
  conns     --conns idle subscribed connections from --sources 127.0.0.x addresses;
            server memory (--pid, children included) before and --settle s after
  durable   notifd only: --conns pipelining connections, --inflight commands each,
            --kind sub|pub, for --duration seconds
  sqlite    no server: SQLite rows/s in --db, one transaction per row and batched
  replay    notifd only: one connection's replay (WATCH SINCE 0) of --count kept
            notifications, MSGs/s
  replay-fill  no server: adds --count notifications of --payload bytes to the
            database --db of a stopped notifd, for replay
options:
  --server notifd|redis|nats|mqtt   --addr 127.0.0.1:PORT   --payload 64
  --timeout SECONDS (whole run, default 120)
  --tls --ca FILE   every connection through TLS, the server's certificate (for the
            name localhost) checked against the PEM file FILE";

/// Room for the send time and the sequence number that every payload starts with.
const PAYLOAD_MIN: usize = 40;

/// What to measure, against which server, and for how long.
#[derive(Clone, Debug)]
pub struct Args {
    pub scenario: String,
    pub server: Server,
    pub addr: SocketAddr,
    pub subs: usize,
    pub msgs: u64,
    pub window: usize,
    pub rate: u64,
    pub duration: Duration,
    pub pairs: usize,
    pub conns: usize,
    pub sources: usize,
    pub pid: Option<u32>,
    pub settle: Duration,
    pub inflight: usize,
    pub kind: String,
    pub db: PathBuf,
    pub payload: usize,
    pub count: u64,
    pub timeout: Duration,
    /// `--tls --ca FILE`: the client configuration every connection uses.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// `Err` with an empty text means help was asked for.
pub fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        scenario: String::new(),
        server: Server::Notifd,
        addr: "127.0.0.1:7600".parse().unwrap(),
        subs: 100,
        msgs: 10_000_000,
        window: 256,
        rate: 1000,
        duration: Duration::from_secs(5),
        pairs: 100,
        conns: 1000,
        sources: 0,
        pid: None,
        settle: Duration::from_secs(10),
        inflight: 64,
        kind: "sub".into(),
        db: PathBuf::from("notif-bench.db"),
        payload: 64,
        count: 1_000_000,
        timeout: Duration::from_secs(120),
        tls: None,
    };
    let mut tls = false;
    let mut ca: Option<PathBuf> = None;
    let argv: Vec<String> = env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        if k == "-h" || k == "--help" {
            return Err(String::new());
        }
        if k == "--tls" {
            tls = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| -> Result<u64, String> {
            v.parse::<u64>().map_err(|_| format!("{k}: bad number {v:?}"))
        };
        let secs = |v: &str| -> Result<Duration, String> {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e6)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{k}: bad duration {v:?}"))
        };
        match k.as_str() {
            "--scenario" => a.scenario = v.clone(),
            "--server" => {
                a.server = match v.as_str() {
                    "notifd" => Server::Notifd,
                    "redis" => Server::Redis,
                    "nats" => Server::Nats,
                    "mqtt" | "mosquitto" => Server::Mqtt,
                    _ => return Err(format!("unknown server {v}")),
                }
            }
            "--addr" => a.addr = v.parse().map_err(|_| format!("bad address {v}"))?,
            "--subs" => a.subs = num(v)? as usize,
            "--msgs" => a.msgs = num(v)?,
            "--window" => a.window = num(v)?.max(1) as usize,
            "--rate" => a.rate = num(v)?.max(1),
            "--duration" => a.duration = secs(v)?,
            "--pairs" => a.pairs = num(v)? as usize,
            "--conns" => a.conns = num(v)? as usize,
            "--sources" => a.sources = num(v)? as usize,
            "--pid" => a.pid = Some(num(v)? as u32),
            "--settle" => a.settle = secs(v)?,
            "--inflight" => a.inflight = num(v)?.max(1) as usize,
            "--kind" => a.kind = v.clone(),
            "--db" => a.db = PathBuf::from(v),
            "--payload" => a.payload = num(v)? as usize,
            "--count" => a.count = num(v)?,
            "--timeout" => a.timeout = secs(v)?,
            "--ca" => ca = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if !a.addr.ip().is_loopback() {
        return Err(format!("{}: only loopback addresses are allowed", a.addr));
    }
    if a.payload < PAYLOAD_MIN {
        return Err(format!("--payload must be at least {PAYLOAD_MIN}"));
    }
    match (tls, ca) {
        (true, Some(ca)) => a.tls = Some(crate::tls::client_config(&ca)?),
        (true, None) => return Err("--tls needs --ca FILE".into()),
        (false, Some(_)) => return Err("--ca goes with --tls".into()),
        (false, None) => {}
    }
    if a.kind != "sub" && a.kind != "pub" {
        return Err("--kind is sub or pub".into());
    }
    Ok(a)
}
