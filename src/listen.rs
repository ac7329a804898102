//! The listening socket: getaddrinfo(AF_UNSPEC, AI_PASSIVE), then socket2.
//!
//! Runs once at start-up, before the reactor: this is the only place notifd resolves a
//! name, since getaddrinfo may block.

use socket2::{Domain, Protocol, Socket, Type};
use std::ffi::{CStr, CString};
use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

/// Addresses for `host` and `port` in getaddrinfo's order.
pub fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let node =
        CString::new(host).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "host has a NUL"))?;
    let service = CString::new(port.to_string()).expect("digits");
    // SAFETY: addrinfo is plain old data; all-zero is its documented "no hints" value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    hints.ai_flags = libc::AI_PASSIVE | libc::AI_NUMERICSERV;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: node, service and hints outlive the call; res is freed below.
    let rc = unsafe { libc::getaddrinfo(node.as_ptr(), service.as_ptr(), &hints, &mut res) };
    if rc != 0 {
        // SAFETY: gai_strerror returns a static NUL-terminated string.
        let why = unsafe { CStr::from_ptr(libc::gai_strerror(rc)) }.to_string_lossy().into_owned();
        return Err(io::Error::other(format!("cannot resolve \"{host}\": {why}")));
    }
    let mut out = Vec::new();
    let mut cur = res;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getaddrinfo returned; ai_addr points to a
        // sockaddr of the family it names, of ai_addrlen bytes.
        unsafe {
            let ai = &*cur;
            match ai.ai_family {
                libc::AF_INET => {
                    let sa = &*(ai.ai_addr as *const libc::sockaddr_in);
                    let ip = u32::from_be(sa.sin_addr.s_addr);
                    out.push(SocketAddr::V4(SocketAddrV4::new(ip.into(), u16::from_be(sa.sin_port))));
                }
                libc::AF_INET6 => {
                    let sa = &*(ai.ai_addr as *const libc::sockaddr_in6);
                    out.push(SocketAddr::V6(SocketAddrV6::new(
                        sa.sin6_addr.s6_addr.into(),
                        u16::from_be(sa.sin6_port),
                        sa.sin6_flowinfo,
                        sa.sin6_scope_id,
                    )));
                }
                _ => {}
            }
            cur = ai.ai_next;
        }
    }
    // SAFETY: res came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(res) };
    Ok(out)
}

/// Binds the first address of `host`/`port` that binds, dual-stack for IPv6, non-blocking.
pub fn bind(host: &str, port: u16) -> io::Result<(std::net::TcpListener, SocketAddr)> {
    let addrs = resolve(host, port)?;
    let mut last = io::Error::other(format!("\"{host}\" has no address"));
    for addr in addrs {
        match bind_one(addr) {
            Ok(l) => {
                let local = l.local_addr()?;
                return Ok((l, local));
            }
            Err(e) => last = io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")),
        }
    }
    Err(last)
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // One socket for both families: "::" takes IPv4 clients as mapped addresses.
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// Raises RLIMIT_NOFILE to its hard limit, so `max_clients` can be as large as allowed.
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Lowers `max_clients`, with a warning, to what RLIMIT_NOFILE leaves after the
/// descriptors notifd needs for itself: the listener, poll, the signal pipe, the log,
/// the children's pipes, and a margin so that accept never meets EMFILE.
pub fn fit_max_clients(cfg: &mut crate::config::Config) {
    let nofile = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => soft,
        Err(_) => return,
    };
    let own = 32 + 2 * u64::from(cfg.mail_workers);
    if u64::from(cfg.max_clients) + own > nofile {
        let fit = nofile.saturating_sub(own).max(1) as u32;
        log::warn!(
            "max_clients {} does not fit under RLIMIT_NOFILE {nofile}; lowered to {fit}",
            cfg.max_clients
        );
        cfg.max_clients = fit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_numeric_hosts_in_order() {
        assert_eq!(resolve("127.0.0.1", 7600).unwrap(), vec!["127.0.0.1:7600".parse().unwrap()]);
        assert_eq!(resolve("::", 0).unwrap(), vec!["[::]:0".parse().unwrap()]);
        assert!(resolve("no such host.invalid", 1).is_err());
    }

    #[test]
    fn binds_a_kernel_chosen_port() {
        let (_l, addr) = bind("127.0.0.1", 0).unwrap();
        assert!(addr.port() != 0);
    }
}
