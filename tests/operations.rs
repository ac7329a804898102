//! The operator's contract: listening addresses, signals, exit statuses, the command line,
//! process names, and the mailer end to end with the spool transport.

mod util;

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;
use util::{Client, Daemon, WAIT};

/// Runs the binary to completion with `args` (each run is short: bad configurations,
/// `-t`, `-V`).
fn run(args: &[&str]) -> Output {
    Command::new(util::bin()).args(args).stdin(std::process::Stdio::null()).output().expect("run notifd")
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr).lines().map(str::to_string).collect()
}

#[test]
fn dual_stack_takes_ipv4_and_ipv6() {
    // Without ::1 only the IPv4 half could run, which is not what the name claims.
    if !util::have_ipv6_loopback() {
        util::skip("dual_stack_takes_ipv4_and_ipv6", "this machine has no ::1");
        return;
    }
    let d = Daemon::start("host = \"::\"");
    assert!(d.listen.is_ipv6(), "\"::\" should bind an IPv6 socket, got {}", d.listen);
    let mut v4 = Client::connect(SocketAddr::from(([127, 0, 0, 1], d.port)));
    // An IPv4 client over a dual-stack socket is still loopback: it may publish.
    v4.cmd("SUB ev a@b");
    v4.expect("+OK SUB ev");
    v4.cmd("PUB ev from v4");
    assert!(v4.line().starts_with("MSG ev "));
    assert!(v4.line().starts_with("+OK PUB "));
    let mut v6 = Client::connect(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, d.port)));
    v6.cmd("PUB ev from v6");
    let l = v6.line();
    assert!(l.starts_with("+OK PUB ") && l.ends_with(" 1"), "{l:?}");
    assert!(v4.line().ends_with(" from v6"));
}

#[test]
fn ipv4_wildcard_refuses_ipv6() {
    if !util::have_ipv6_loopback() {
        util::skip("ipv4_wildcard_refuses_ipv6", "this machine has no ::1");
        return;
    }
    let d = Daemon::start("host = \"0.0.0.0\"");
    assert!(d.listen.is_ipv4(), "{}", d.listen);
    let mut c = Client::connect(SocketAddr::from(([127, 0, 0, 1], d.port)));
    c.cmd("PING");
    c.expect("PONG");
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, d.port));
    match TcpStream::connect_timeout(&v6, WAIT) {
        // A SYN that met the listener as it closed is answered with a reset.
        Err(e) => assert!(
            matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset),
            "{e}"
        ),
        Ok(_) => panic!("an IPv4-only daemon accepted a connection on ::1"),
    }
}

#[test]
fn ipv6_loopback_host() {
    if !util::have_ipv6_loopback() {
        util::skip("ipv6_loopback_host", "this machine has no ::1");
        return;
    }
    let d = Daemon::start("host = \"::1\"");
    let mut c = d.client();
    assert!(c.local_addr().is_ipv6());
    c.cmd("PUB ev x");
    assert!(c.line().starts_with("+OK PUB "), "::1 is loopback and may publish");
}

/// SIGTERM or SIGINT with commands in flight: their replies, then exactly
/// `-ERR BUSY shutting down`, then EOF; exit 0 and no child left.
fn graceful_stop(sig: i32) {
    let mut d = Daemon::start("mail_transport = \"spool\"\nmail_workers = 2");
    let pid = d.pid();
    let mut a = d.client();
    a.cmd("SUB warm a@b");
    a.expect("+OK SUB warm");
    d.wait_log_count("notifd-mailer", 2, WAIT);
    let children = util::children_of(pid);
    let mut want = d.all_child_pids();
    want.sort_unstable();
    let mut got = children.clone();
    got.sort_unstable();
    assert_eq!(got, want, "the daemon's children are the store and the mailers");
    assert_eq!(children.len(), 3);

    // The store holds still, so that these commands are in flight when the signal comes.
    let store = d.store_pid();
    let _cont = util::stop_process(store);
    let mut script = String::new();
    for i in 0..20 {
        script.push_str(&format!("SUB ev{i} a@b\r\n"));
    }
    script.push_str("PING last\r\n");
    a.send(&script);
    util::wait_until("the daemon to read the commands", WAIT, || {
        util::server_unread(a.local_addr(), d.port) == Some(0)
    });
    let mut idle = d.client();

    d.signal(sig);
    d.wait_log(|l| l.contains("stopping"), WAIT);
    // No longer accepting.
    match TcpStream::connect_timeout(&d.addr(), WAIT) {
        // A SYN that met the listener as it closed is answered with a reset.
        Err(e) => assert!(
            matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset),
            "{e}"
        ),
        Ok(s) => {
            // Accepted by the kernel's backlog before the close: it must get nothing useful.
            let mut c = Client::from_stream(s);
            assert!(!matches!(c.try_line(Duration::from_secs(1)), Ok(Some(l)) if l.starts_with("HELLO")));
        }
    }
    // No longer reading commands.
    a.cmd("PING too late");
    util::signal(store, libc::SIGCONT);

    for i in 0..20 {
        a.expect(&format!("+OK SUB ev{i}"));
    }
    a.expect("PONG last");
    a.expect("-ERR BUSY shutting down");
    a.expect_eof();
    idle.expect("-ERR BUSY shutting down");
    idle.expect_eof();

    let st = d.wait_exit(WAIT).expect("the daemon exits after a graceful stop");
    assert_eq!(st.code(), Some(0), "exit status {st:?}");
    for c in children {
        util::wait_gone(c, WAIT);
    }
    // The exit can be seen before the log's last line is collected.
    d.wait_log(|l| l.contains("stopped"), WAIT);
    // What was acknowledged is stored.
    let db = d.db();
    let n: i64 =
        db.query_row("SELECT count(*) FROM subscriptions WHERE email = 'a@b'", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 21);
}

#[test]
fn sigterm_stops_gracefully() {
    graceful_stop(libc::SIGTERM);
}

#[test]
fn sigint_stops_gracefully() {
    graceful_stop(libc::SIGINT);
}

#[test]
fn a_stopped_store_is_reaped_not_left_a_zombie() {
    let d = Daemon::start("");
    let first = d.store_pid();
    util::signal(first, libc::SIGKILL);
    d.wait_log(|l| l.contains("notifd-store lost"), WAIT);
    util::wait_until("the old store to be reaped", WAIT, || util::stat(first).is_none());
    d.wait_log_count("notifd-store started", 2, WAIT);
    let second = d.store_pid();
    assert_ne!(first, second);
    assert_eq!(util::stat(second).map(|s| s.1), Some(d.pid()));
    let mut c = d.client();
    c.cmd("SUB ev a@b");
    c.expect("+OK SUB ev");
}

#[test]
fn bad_configuration_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bad.conf");
    let name = conf.display().to_string();
    for (text, want) in [
        (
            "port = 0\nprot = 7600\n",
            format!("notifd: {name} line 2: unknown key \"prot\" (did you mean \"port\"?)"),
        ),
        (
            "# comment\n\nport = \"x\"\n",
            format!("notifd: {name} line 3: \"port\" must be an integer, not string"),
        ),
    ] {
        std::fs::write(&conf, text).unwrap();
        let o = run(&["-c", &name]);
        assert_eq!(o.status.code(), Some(2), "{text:?}: {o:?}");
        assert_eq!(stderr_lines(&o), std::slice::from_ref(&want), "{text:?}");
        // -t says the same.
        let o = run(&["-t", "-c", &name]);
        assert_eq!(o.status.code(), Some(2), "-t {text:?}");
        assert_eq!(stderr_lines(&o), [want], "-t {text:?}");
        assert!(o.stdout.is_empty());
    }
    // An impossible value names its line and key.
    std::fs::write(&conf, "port = 0\nmax_line = -1\n").unwrap();
    let o = run(&["-c", &name]);
    assert_eq!(o.status.code(), Some(2));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("notifd: {name} line 2: ")) && lines[0].contains("max_line"),
        "{lines:?}"
    );
    // Nothing was created.
    assert!(!dir.path().join("db").exists());
}

#[test]
fn config_test_flag() {
    let dir = tempfile::tempdir().unwrap();
    let conf = util::write_config(dir.path(), "");
    let o = run(&["-t", "-c", conf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "configuration OK\n");
    assert!(o.stderr.is_empty(), "{o:?}");
    // -t creates nothing.
    assert!(!dir.path().join("db").exists(), "-t created the database folder");

    // A problem beyond the syntax: a sendmail that cannot run.
    let not_exec = dir.path().join("sendmail");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let conf = util::write_config(
        dir.path(),
        &format!("mail_transport = \"sendmail\"\nsendmail_path = {:?}", not_exec.display().to_string()),
    );
    let o = run(&["-t", "-c", conf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(o.stdout.is_empty());
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("notifd: ") && lines[0].contains("sendmail_path"), "{lines:?}");
}

#[test]
fn version_flag() {
    let o = run(&["-V"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim_end(), format!("notifd {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn missing_config_file_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.conf");
    let o = run(&["-c", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("notifd: ") && lines[0].contains("nope.conf"), "{lines:?}");
}

#[test]
fn usage_errors_are_exit_2() {
    for args in [&["-x"][..], &["extra"], &["-c"], &["-t", "-q"]] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("notifd: ") && err.contains("usage"), "{args:?}: {err:?}");
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn process_names() {
    let d = Daemon::start("mail_transport = \"spool\"\nmail_workers = 2");
    d.wait_log_count("notifd-mailer", 2, WAIT);
    assert_eq!(util::comm(d.pid()).as_deref(), Some("notifd"));
    // The reactor logs a child's pid right after fork(); the child names itself a moment
    // later, so allow it that moment.
    let named = |pid: i32, name: &str| {
        util::wait_until(&format!("pid {pid} to be named {name}"), WAIT, || {
            util::comm(pid).as_deref() == Some(name)
        });
    };
    let store = d.store_pid();
    named(store, "notifd-store");
    assert_eq!(util::stat(store).map(|s| s.1), Some(d.pid()));
    let mailers = d.mailer_pids();
    assert_eq!(mailers.len(), 2, "{mailers:?}");
    for m in mailers {
        named(m, "notifd-mailer");
        assert_eq!(util::stat(m).map(|s| s.1), Some(d.pid()));
    }
}

#[test]
fn spool_transport_writes_an_eml_per_address() {
    let d = Daemon::start("mail_transport = \"spool\"");
    let mut c = d.client();
    c.cmd("SUB orders.shipped ana@example.com");
    c.expect("+OK SUB orders.shipped");
    c.cmd("SUB orders.shipped bob@Example.org");
    c.expect("+OK SUB orders.shipped");
    let (id, n) = util::publish(&mut d.client(), "orders.shipped", "Order 1042 has shipped");
    assert_eq!(n, 1);
    let spool = d.path("spool");
    let want = [format!("{id}-ana@example.com.eml"), format!("{id}-bob@example.org.eml")];
    util::wait_until("two .eml files in the spool", WAIT, || want.iter().all(|f| spool.join(f).exists()));
    let raw = std::fs::read(spool.join(&want[0])).unwrap();
    let mail = mailparse::parse_mail(&raw).expect("a parseable email");
    assert_eq!(util::header(&mail, "To"), "ana@example.com");
    assert!(util::header(&mail, "Subject").contains("orders.shipped"));
    assert!(mail.get_body().unwrap().contains("Order 1042 has shipped"));
    // Only finished files: no temporary names left behind.
    util::wait_until("the outbox to record both as sent", WAIT, || {
        let db = d.db();
        let sent: i64 = db
            .query_row(
                "SELECT count(*) FROM outbox WHERE notification_id = ?1 AND state = 'sent'",
                [id as i64],
                |r| r.get(0),
            )
            .unwrap_or(0);
        sent == 2
    });
    let names: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".eml")), "{names:?}");
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn mail_transport_none_queues_nothing() {
    let d = Daemon::start("");
    let mut c = d.client();
    c.cmd("SUB ev a@b");
    c.expect("+OK SUB ev");
    c.cmd("PUB ev x");
    assert!(c.line().starts_with("MSG "));
    assert!(c.line().starts_with("+OK PUB "));
    let n: i64 = d.db().query_row("SELECT count(*) FROM outbox", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 0);
    assert!(d.mailer_pids().is_empty(), "no mailer without a transport");
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn open_fds(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

#[test]
fn out_of_descriptors_on_accept_neither_spins_nor_kills_the_daemon() {
    let d = Daemon::start("");
    let pid = d.pid();
    let mut first = Client::connect(d.addr());
    first.cmd("PING");
    first.expect("PONG");
    // Leave the daemon room for three more descriptors only (max_clients was sized for
    // the old limit), so accept fails with EMFILE while clients keep coming.
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit reads the daemon's limit into `old`.
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) }, 0);
    let rl = libc::rlimit { rlim_cur: open_fds(pid) + 3, rlim_max: old.rlim_max };
    // SAFETY: prlimit on the daemon's pid with a valid new soft limit.
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &rl, std::ptr::null_mut()) }, 0);
    let waiting: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(d.addr()).unwrap()).collect();
    d.wait_log(|l| l.contains("out of file descriptors"), WAIT);
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(pid) - before;
    assert!(spent < 30, "the daemon spun for {spent} ticks in one second");
    // Still serving the connections it has.
    first.cmd("PING");
    first.expect("PONG");
    // Once descriptors are free again, the clients waiting in the backlog are taken,
    // with no new connection to wake the listener.
    // SAFETY: as above, back to the old limit.
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &old, std::ptr::null_mut()) }, 0);
    for s in waiting {
        let mut c = Client::from_stream(s);
        let g = c.line();
        assert!(g.starts_with("HELLO notifd 1"), "a waiting client got {g:?}");
        c.cmd("PING");
        c.expect("PONG");
    }
    first.cmd("PING");
    first.expect("PONG");
}
