//! notifd: command line and start-up. See README.md and notifd(8).

use notifd::config::Transport;
use notifd::config::{self, Config};
use notifd::{daemon, listen, logger, reactor};
use std::path::PathBuf;

const USAGE: &str = "usage: notifd [-c file] [-d] [-t] [-v] [-V]";

struct Args {
    config: Option<PathBuf>,
    detach: bool,
    test: bool,
    verbose: u8,
    version: bool,
}

fn main() {
    std::process::exit(try_main());
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { config: None, detach: false, test: false, verbose: 0, version: false };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let arg = arg.into_string().map_err(|_| "arguments must be UTF-8".to_string())?;
        let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            return Err(format!("unexpected argument \"{arg}\""));
        };
        for (i, f) in flags.char_indices() {
            match f {
                'c' => {
                    let rest = &flags[i + 1..];
                    let file = if rest.is_empty() {
                        it.next().ok_or("-c needs a file")?.into_string().map_err(|_| "file must be UTF-8")?
                    } else {
                        rest.to_string()
                    };
                    a.config = Some(file.into());
                    break;
                }
                'd' => a.detach = true,
                't' => a.test = true,
                'v' => a.verbose = a.verbose.saturating_add(1),
                'V' => a.version = true,
                other => return Err(format!("unknown option -{other}")),
            }
        }
    }
    Ok(a)
}

fn try_main() -> i32 {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("notifd: {e}\n{USAGE}");
            return 2;
        }
    };
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
    for _ in 0..args.verbose {
        cfg.log_level = match cfg.log_level {
            log::LevelFilter::Off | log::LevelFilter::Error => log::LevelFilter::Warn,
            log::LevelFilter::Warn => log::LevelFilter::Info,
            log::LevelFilter::Info => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        };
    }
    if args.test {
        return match daemon::check(&cfg) {
            Ok(()) => {
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
    let user = daemon::target_user(&cfg).map_err(|e| (2, e))?;
    if detach {
        daemon::check_pid_file(&cfg.pid_file).map_err(fatal)?;
    }
    listen::raise_nofile();
    listen::fit_max_clients(&mut cfg);
    let (listener, addr) = listen::bind(&cfg.host, cfg.port).map_err(|e| fatal(e.to_string()))?;
    // Secrets are read now, while the files may still need root to read.
    let mail = cfg.mail_settings().map_err(|e| (2, e))?;
    let mut dirs = vec![cfg.database.parent().map(PathBuf::from).unwrap_or_default()];
    if cfg.mail_transport == Transport::Spool {
        dirs.push(cfg.spool_dir.clone());
    }
    if detach {
        dirs.push(cfg.pid_file.parent().map(PathBuf::from).unwrap_or_default());
    }
    for d in &dirs {
        daemon::make_dir(d, user.as_ref()).map_err(fatal)?;
    }
    if let (Some(u), Some(config::LogTarget::File(path))) = (&user, &cfg.log) {
        // The log is reopened on SIGHUP and by restarted children, after privileges
        // are dropped: it must belong to the user they run as.
        daemon::own_file(path, u).map_err(fatal)?;
    }
    let mut ready = if detach { daemon::detach().map_err(fatal)? } else { daemon::Ready::foreground() };
    let result = serve(cfg, listener, addr, mail, user, &mut ready, detach);
    if let Err((_, why)) = &result {
        ready.fail(why);
    }
    result
}

fn serve(
    cfg: Config,
    listener: std::net::TcpListener,
    addr: std::net::SocketAddr,
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
    if detach {
        // Before the children are forked, so that none of them holds the terminal or
        // the pipes of whoever started `notifd -d`; start-up errors from here on reach
        // the foreground process through `ready`.
        daemon::close_stdio().map_err(|e| fatal(format!("cannot open /dev/null: {e}")))?;
    }
    let mut r = reactor::Reactor::new(cfg, listener, mail).map_err(|e| fatal(format!("start-up: {e}")))?;
    r.wait_store(std::time::Duration::from_secs(30)).map_err(fatal)?;
    log::info!("listening on {addr}");
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
