//! Client sockets: accepting, reading and framing lines, writing and closing.

use super::*;

impl Reactor {
    pub(super) fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((sock, peer)) => {
                    self.out_of_fds = false;
                    self.admit(sock, peer)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // The pending connection stays in the backlog; try again shortly
                    // rather than spin on a readable listener we cannot serve.
                    if !self.out_of_fds {
                        // Once per episode: it repeats every 100 ms while it lasts.
                        log::warn!("accept: out of file descriptors; retrying every 100 ms");
                        self.out_of_fds = true;
                    }
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    pub(super) fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr) {
        // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; log them as a.b.c.d.
        let peer = match peer {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => peer,
            },
            v4 => v4,
        };
        let key = ip_key(peer.ip());
        let from_ip = self.per_ip.get(&key).copied().unwrap_or(0);
        let busy = if self.conns.len() >= self.cfg.max_clients as usize {
            Some("too many connections")
        } else if from_ip >= self.cfg.max_clients_per_ip {
            Some("too many connections from your address")
        } else {
            None
        };
        if let Some(why) = busy {
            log::debug!("{peer}: refused: {why}");
            let mut line = Vec::new();
            protocol::err(&mut line, Code::Busy, why);
            // A fresh socket's buffer takes one short line; if not, the client was gone.
            let _ = io::Write::write(&mut sock, &line);
            return;
        }
        let _ = sock.set_nodelay(true);
        if self.cfg.tcp_keepalive > 0 {
            let ka =
                socket2::TcpKeepalive::new().with_time(Duration::from_secs(self.cfg.tcp_keepalive.into()));
            let _ = socket2::SockRef::from(&sock).set_tcp_keepalive(&ka);
        }
        let entry = self.conns.vacant_entry();
        let k = entry.key();
        if let Err(e) =
            self.poll.registry().register(&mut sock, Token(k), Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("{peer}: register: {e}");
            return;
        }
        let mut c = Conn::new(self.next_conn_id, sock, peer);
        self.next_conn_id += 1;
        protocol::greeting(&mut c.out, self.cfg.max_line);
        c.dirty = true;
        entry.insert(c);
        *self.per_ip.entry(key).or_insert(0) += 1;
        self.dirty.push(k);
        log::debug!("{peer}: connected");
    }

    pub(super) fn conn_event(&mut self, key: usize, readable: bool, writable: bool) {
        if !self.conns.contains(key) {
            return;
        }
        if writable {
            self.mark_dirty(key);
        }
        if readable {
            self.read_conn(key);
        }
    }

    pub(super) fn mark_dirty(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(key);
        }
    }

    /// Reads and handles commands until WouldBlock, a pause, or the turn's budget.
    pub(super) fn read_conn(&mut self, key: usize) {
        let mut budget = READ_BUDGET;
        loop {
            let c = &mut self.conns[key];
            if c.state != State::Open || c.paused || c.eof {
                return;
            }
            if budget == 0 {
                self.resume.push(key);
                return;
            }
            let mut buf = std::mem::take(&mut self.scratch);
            let got = c.sock.read(&mut buf);
            match got {
                Ok(0) => {
                    self.scratch = buf;
                    self.conn_eof(key);
                    return;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if self.conns[key].inbuf.is_empty() {
                        let used = self.take_lines(key, &buf[..n]);
                        if let Some(c) = self.conns.get_mut(key) {
                            if c.state == State::Open {
                                c.inbuf.extend_from_slice(&buf[used..n]);
                            }
                        }
                    } else {
                        self.conns[key].inbuf.extend_from_slice(&buf[..n]);
                        self.process_inbuf(key);
                    }
                    self.scratch = buf;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.scratch = buf;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.scratch = buf,
                Err(e) => {
                    self.scratch = buf;
                    log::debug!("{}: read: {e}", self.conns[key].peer);
                    self.close(key);
                    return;
                }
            }
        }
    }

    /// Handles the complete lines held in the connection's input buffer.
    pub(super) fn process_inbuf(&mut self, key: usize) {
        let inbuf = std::mem::take(&mut self.conns[key].inbuf);
        let used = self.take_lines(key, &inbuf);
        if let Some(c) = self.conns.get_mut(key) {
            if c.state == State::Open && used < inbuf.len() {
                let mut rest = inbuf;
                rest.drain(..used);
                c.inbuf = rest;
            }
        }
    }

    /// The peer closed its side: like QUIT, without the reply.
    pub(super) fn conn_eof(&mut self, key: usize) {
        let c = &mut self.conns[key];
        c.eof = true;
        if !c.inbuf.is_empty() && !c.discarding && !c.paused {
            // A last line without its LF is still a command.
            c.inbuf.push(b'\n');
            self.process_inbuf(key);
        }
        if let Some(c) = self.conns.get_mut(key) {
            if c.state == State::Open && !c.paused {
                c.state = State::Draining;
                c.inbuf = Vec::new();
                self.mark_dirty(key);
            }
        }
    }

    /// Whether the connection may take one more command now.
    pub(super) fn can_take(&self, c: &Conn) -> bool {
        // A client that sends without reading its replies stops being read once its
        // output is over budget, rather than growing it without bound.
        c.slots.len() < self.cfg.max_inflight as usize
            && c.out.len() < self.cfg.max_pending
            && !self.store_congested()
            && self.has_ids()
    }

    pub(super) fn store_congested(&self) -> bool {
        self.children[0].backlog() > STORE_BACKLOG_MAX || self.pending.len() > STORE_PENDING_MAX
    }

    /// Takes and handles lines from `data`; returns the bytes used. Stops early when the
    /// connection must pause or stops reading.
    pub(super) fn take_lines(&mut self, key: usize, data: &[u8]) -> usize {
        let max_line = self.cfg.max_line;
        let mut at = 0;
        loop {
            let Some(c) = self.conns.get(key) else { return data.len() };
            if c.state != State::Open {
                return data.len();
            }
            if !self.can_take(c) {
                self.pause(key);
                return at;
            }
            let c = &mut self.conns[key];
            let (item, used) = protocol::take_line(&data[at..], max_line, &mut c.discarding);
            if used == 0 {
                return at;
            }
            match item {
                None => {}
                Some(Framed::TooLong) => {
                    let text = format!("line longer than {max_line} bytes");
                    c.reply(&self.fan, |out| protocol::err(out, Code::TooLong, &text));
                    self.mark_dirty(key);
                }
                Some(Framed::Line(line)) => self.command(key, line),
            }
            at += used;
        }
    }

    pub(super) fn pause(&mut self, key: usize) {
        let global = self.store_congested() || !self.has_ids();
        let c = &mut self.conns[key];
        if !c.paused {
            c.paused = true;
            if global {
                self.waiting_store.push(key);
            }
            // Otherwise max_inflight: resumed when a reply goes out (fill_slot).
        }
    }

    pub(super) fn resume_conns(&mut self) {
        if !self.waiting_store.is_empty() && !self.store_congested() && self.has_ids() {
            let w = std::mem::take(&mut self.waiting_store);
            self.resume.extend(w);
        }
        let list = std::mem::take(&mut self.resume);
        for key in list {
            let Some(c) = self.conns.get_mut(key) else { continue };
            if c.state != State::Open {
                continue;
            }
            c.paused = false;
            if !c.inbuf.is_empty() {
                self.process_inbuf(key);
            }
            let Some(c) = self.conns.get(key) else { continue };
            if c.paused || c.state != State::Open {
                continue;
            }
            if c.eof {
                self.conn_eof(key);
            } else {
                self.read_conn(key);
            }
        }
    }

    pub(super) fn flush_conns(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            let Some(c) = self.conns.get_mut(key) else { continue };
            c.dirty = false;
            if c.state == State::Closing {
                continue;
            }
            if let Err(e) = c.flush(&self.fan) {
                log::debug!("{}: write: {e}", c.peer);
                c.state = State::Closing;
                self.closing.push(key);
                continue;
            }
            // Only QUIT or EOF make a connection finish here: one the server is stopping
            // is closed by stop_step, after its `-ERR BUSY shutting down`.
            if c.finished() {
                c.state = State::Closing;
                self.closing.push(key);
            } else if c.paused && c.out.len() < self.cfg.max_pending / 2 {
                // Paused for its output budget (or something that resume re-checks).
                self.resume.push(key);
            }
        }
        self.dirty.clear();
        // Every connection that shared the buffer was dirty, so it is written or closed.
        self.fan.clear();
        if self.fan.capacity() > FAN_KEEP {
            self.fan = Vec::with_capacity(64 * 1024);
        }
    }

    pub(super) fn close(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if c.state != State::Closing {
                c.state = State::Closing;
                self.closing.push(key);
            }
        }
    }

    /// Frees connections marked closing: never in the middle of a dispatch.
    pub(super) fn reap_conns(&mut self) {
        let closing = std::mem::take(&mut self.closing);
        for key in closing {
            if !self.conns.contains(key) {
                continue;
            }
            let mut c = self.conns.remove(key);
            let _ = self.poll.registry().deregister(&mut c.sock);
            let events: HashSet<Rc<str>> = c.subs.iter().map(|(e, _)| Rc::clone(e)).collect();
            for e in events {
                self.unindex(key, &e);
            }
            let k = ip_key(c.peer.ip());
            if let Some(n) = self.per_ip.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&k);
                }
            }
            log::debug!("{}: closed", c.peer);
        }
    }
}

#[derive(Hash, PartialEq, Eq, Clone, Copy)]
pub(super) enum IpKey {
    V4(u32),
    /// The /64 of an IPv6 address: one host usually holds a whole /64.
    V6(u64),
}

pub(super) fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(a) => IpKey::V4(a.into()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpKey::V4(v4.into()),
            None => IpKey::V6((u128::from(a) >> 64) as u64),
        },
    }
}
