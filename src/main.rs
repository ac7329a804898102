//! notifd: command line and start-up. See README.md and notifd(8).

use notifd::config::{self, Config};
use notifd::{daemon, listen, logger, reactor};
use std::ffi::OsString;
use std::path::PathBuf;

const USAGE: &str = "usage: notifd [-c file] [-d] [-h] [-t] [-v] [-V]";

#[derive(Debug, Default)]
struct Args {
    config: Option<PathBuf>,
    detach: bool,
    help: bool,
    test: bool,
    verbose: u8,
    version: bool,
}

fn main() {
    std::process::exit(try_main());
}

/// The command line without the program name; `Err` is a usage error.
fn parse_args(argv: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    use lexopt::Arg::{Long, Short, Value};
    let mut a = Args::default();
    let mut parser = lexopt::Parser::from_args(argv);
    // As getopt(3): `-cFILE` takes FILE whole, even when it starts with `=`.
    parser.set_short_equals(false);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('c') => a.config = Some(parser.value().map_err(|_| "-c needs a file")?.into()),
            Short('d') => a.detach = true,
            Short('h') | Long("help") => a.help = true,
            Short('t') => a.test = true,
            Short('v') => a.verbose = a.verbose.saturating_add(1),
            Short('V') | Long("version") => a.version = true,
            Short(other) => return Err(format!("unknown option -{other}")),
            Long(other) => return Err(format!("unknown option --{other}")),
            Value(v) => return Err(format!("unexpected argument {:?}", v.to_string_lossy())),
        }
    }
    Ok(a)
}

fn try_main() -> i32 {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("notifd: {e}\n{USAGE}");
            return 2;
        }
    };
    if args.help {
        println!("{USAGE}");
        return 0;
    }
    if args.version {
        println!("notifd {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    let loaded = match &args.config {
        Some(p) => Config::load(p, false),
        None => Config::load(&config::default_path(), true),
    };
    let mut cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("notifd: {e}");
            return 2;
        }
    };
    cfg.raise_level(args.verbose);
    if args.test {
        return match daemon::check(&cfg) {
            Ok(warnings) => {
                for w in warnings {
                    eprintln!("notifd: warning: {w}");
                }
                println!("configuration OK");
                0
            }
            Err(e) => {
                eprintln!(
                    "notifd: {}: {e}",
                    cfg.file.as_deref().unwrap_or(&config::default_path()).display()
                );
                2
            }
        };
    }
    logger::init(cfg.log_level);
    match start(cfg, args.detach) {
        Ok(status) => status,
        Err((status, why)) => {
            log::error!("{why}");
            if !args.detach {
                // The log may be a file or syslog: say it where the operator looks.
                eprintln!("notifd: {why}");
            }
            status
        }
    }
}

/// Everything from binding the port to the end of the reactor.
fn start(mut cfg: Config, detach: bool) -> Result<i32, (i32, String)> {
    let fatal = |why: String| (1, why);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(daemon::UMASK));
    let user = daemon::target_user(&cfg).map_err(|e| (2, e))?;
    for w in cfg.warnings() {
        log::warn!("{w}");
    }
    if detach {
        daemon::check_pid_file(&cfg.pid_file).map_err(fatal)?;
    }
    listen::raise_nofile();
    listen::fit_max_clients(&mut cfg);
    let plain = match cfg.plain {
        true => Some(listen::bind(&cfg.host, cfg.port).map_err(|e| fatal(e.to_string()))?),
        false => None,
    };
    // The TLS files are read now too (again on HUP, as `user`): a bad pair stops here.
    let tls = match notifd::tls::from_config(&cfg).map_err(|e| (2, e.to_string()))? {
        Some(config) => {
            let (l, a) = listen::bind(&cfg.host, cfg.tls_port).map_err(|e| fatal(e.to_string()))?;
            Some((l, a, config))
        }
        None => None,
    };
    // Bound now too: a port below 1024 needs root, which is dropped in `serve`.
    let http = match cfg.http_host.as_str() {
        "" => None,
        host => Some(listen::bind(host, cfg.http_port).map_err(|e| fatal(format!("http: {e}")))?),
    };
    // What emails name as the server's port when `port` is 0 (or the plain port is shut).
    cfg.bound_port = match (&plain, &tls) {
        (Some((_, a)), _) | (None, Some((_, a, _))) => a.port(),
        (None, None) => cfg.port,
    };
    // Secrets are read now, while the files may still need root to read.
    let mail = cfg.mail_settings().map_err(|e| (2, e))?;
    for d in daemon::data_dirs(&cfg, detach) {
        daemon::make_dir(&d, user.as_ref()).map_err(fatal)?;
    }
    // The log is reopened on SIGHUP and by restarted children, after privileges are
    // dropped: it must belong to the user they run as.
    daemon::prepare_log(&cfg, user.as_ref()).map_err(fatal)?;
    let mut ready = if detach { daemon::detach().map_err(fatal)? } else { daemon::Ready::foreground() };
    let result = serve(cfg, Listeners { plain, tls, http }, mail, user, &mut ready, detach);
    if let Err((_, why)) = &result {
        ready.fail(why);
    }
    result
}

/// A bound listening socket and its address.
type Bound = (std::net::TcpListener, std::net::SocketAddr);

/// The bound listening sockets with their addresses, and the TLS configuration.
struct Listeners {
    plain: Option<Bound>,
    tls: Option<(std::net::TcpListener, std::net::SocketAddr, std::sync::Arc<rustls::ServerConfig>)>,
    http: Option<Bound>,
}

fn serve(
    cfg: Config,
    listeners: Listeners,
    mail: notifd::ipc::MailSettings,
    user: Option<nix::unistd::User>,
    ready: &mut daemon::Ready,
    detach: bool,
) -> Result<i32, (i32, String)> {
    let fatal = |why: String| (1, why);
    logger::configure(&daemon::log_target(&cfg), cfg.log_level)
        .map_err(|e| fatal(format!("cannot open the log: {e}")))?;
    if let Some(u) = &user {
        daemon::drop_privileges(u).map_err(fatal)?;
        log::info!("running as user {}", u.name);
    }
    let pid_file = cfg.pid_file.clone();
    let (database, store_settings) = (cfg.database.clone(), cfg.store_settings());
    if detach {
        // Before the children are forked, so that none of them holds the terminal or
        // the pipes of whoever started `notifd -d`; start-up errors from here on reach
        // the foreground process through `ready`.
        daemon::close_stdio().map_err(|e| fatal(format!("cannot open /dev/null: {e}")))?;
    }
    let plain_addr = listeners.plain.as_ref().map(|p| p.1);
    let tls_addr = listeners.tls.as_ref().map(|t| t.1);
    let tls = listeners.tls.map(|(l, _, config)| (l, config));
    let mut r = reactor::Reactor::new(cfg, listeners.plain.map(|p| p.0), tls, mail)
        .map_err(|e| fatal(format!("start-up: {e}")))?;
    let http_addr = match listeners.http {
        Some((l, a)) => {
            r.add_http(l).map_err(|e| fatal(format!("start-up: http: {e}")))?;
            Some(a)
        }
        None => None,
    };
    if let Err(e) = r.wait_store(std::time::Duration::from_secs(30)) {
        // A store that exited said why in the log, which may be a syslog nobody reads
        // (or none at all on a minimal host): find out again, for the terminal. One
        // that is merely slow still holds the database; asking again would only blame
        // its lock.
        let exited = e.contains("exited");
        return Err(match exited.then(|| daemon::store_failure(&database, &store_settings)).flatten() {
            Some(why) => fatal(format!("{}: {why}", e.replace(" (the log says why)", ""))),
            None => fatal(e),
        });
    }
    // The plain line first: tests and scripts take the first `listening on` line for it.
    if let Some(addr) = plain_addr {
        log::info!("listening on {addr}");
    }
    if let Some(addr) = tls_addr {
        log::info!("tls listening on {addr}");
    }
    if let Some(a) = http_addr {
        log::info!("http listening on {a}");
    }
    if detach {
        daemon::write_pid_file(&pid_file).map_err(fatal)?;
    }
    ready.ok();
    // A fatal error (a child speaking another record version) comes back here too, so
    // that the pid file goes with the daemon.
    let status = r.run();
    if detach {
        let _ = std::fs::remove_file(&pid_file);
    }
    status.map_err(fatal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn flags_alone_and_grouped() {
        let a = parse(&["-d", "-t", "-v", "-v", "-c", "/etc/x.conf"]).unwrap();
        assert!(a.detach && a.test && !a.help && !a.version);
        assert_eq!(a.verbose, 2);
        assert_eq!(a.config, Some(PathBuf::from("/etc/x.conf")));
        let b = parse(&["-dtvvc/etc/x.conf"]).unwrap();
        assert!(b.detach && b.test);
        assert_eq!(b.verbose, 2);
        assert_eq!(b.config, a.config);
        assert_eq!(parse(&["-vc", "f"]).unwrap().config, Some(PathBuf::from("f")));
        // getopt(3): the value is what follows the letter, `=` included.
        assert_eq!(parse(&["-c=f"]).unwrap().config, Some(PathBuf::from("=f")));
        assert_eq!(parse(&[]).unwrap().verbose, 0);
    }

    #[test]
    fn help_and_version_long_and_short() {
        assert!(parse(&["-h"]).unwrap().help);
        assert!(parse(&["--help"]).unwrap().help);
        assert!(parse(&["-V"]).unwrap().version);
        assert!(parse(&["--version"]).unwrap().version);
    }

    #[test]
    fn usage_errors_not_panics() {
        assert_eq!(parse(&["-é"]).unwrap_err(), "unknown option -é");
        assert_eq!(parse(&["-dé"]).unwrap_err(), "unknown option -é");
        assert_eq!(parse(&["-x"]).unwrap_err(), "unknown option -x");
        assert_eq!(parse(&["--frobnicate"]).unwrap_err(), "unknown option --frobnicate");
        assert_eq!(parse(&["-c"]).unwrap_err(), "-c needs a file");
        assert_eq!(parse(&["run"]).unwrap_err(), "unexpected argument \"run\"");
        assert_eq!(parse(&["-"]).unwrap_err(), "unexpected argument \"-\"");
        assert!(parse(&["--help=yes"]).is_err());
        assert!(parse_args([OsString::from_vec(vec![b'-', 0xff])]).is_err());
    }

    #[test]
    fn a_configuration_path_need_not_be_utf8() {
        let path = OsString::from_vec(b"/tmp/\xffnotifd.conf".to_vec());
        let a = parse_args([OsString::from("-c"), path.clone()]).unwrap();
        assert_eq!(a.config, Some(PathBuf::from(path)));
    }
}
