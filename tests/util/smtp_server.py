#!/usr/bin/env python3
"""A real SMTP server (aiosmtpd) for notifd's tests, on a loopback port.

It prints "PORT <n>" on stdout once it listens, and exits when its stdin closes (the
test that started it is gone) or after --lifetime seconds. Everything it sees is
appended to <dir>/events.log, one line each, flushed before the SMTP reply is sent, so
a client that got its reply can read the log at once:

    conn <n>                       a connection was accepted (n counts from 1)
    msg <n> <file> tls|plain       a message was accepted on connection n, saved in <dir>/<file>
    reply <n> <code>               a MAIL or RCPT was refused with <code>

Options shape the refusals: --tempfail N answers "421" to the first N MAIL commands;
--reject-rcpt SUBSTR answers "550" to each RCPT whose address contains SUBSTR;
--defer-rcpt SUBSTR answers "451" likewise; --max-per-conn N answers "421" to a MAIL after
N messages on one connection (as Exim does after 1,000). --cert/--key offer STARTTLS, required.
--implicit-tls serves TLS from the first byte instead. --auth USER:PASSWORD requires
AUTH (PLAIN or LOGIN) before MAIL. --no-save counts messages without writing them (for
throughput runs). --port N listens on that port instead of a free one (a relay that was
down comes back where the client expects it).
"""

import argparse
import asyncio
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Recorder:
    def __init__(self, args):
        self.args = args
        self.dir = args.dir
        self.log = open(os.path.join(self.dir, "events.log"), "a", buffering=1)
        self.conns = 0
        self.mails = 0
        self.saved = 0

    def event(self, line):
        self.log.write(line + "\n")
        self.log.flush()

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails += 1
        if self.args.max_per_conn and getattr(session, "accepted", 0) >= self.args.max_per_conn:
            self.event(f"reply {session.conn_no} 421")
            return "421 4.7.0 Too many messages on this connection"
        if self.mails <= self.args.tempfail:
            self.event(f"reply {session.conn_no} 421")
            return "421 4.3.2 Service not available, try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.args.reject_rcpt and self.args.reject_rcpt in address:
            self.event(f"reply {session.conn_no} 550")
            return "550 5.1.1 <%s>: Recipient address rejected: no such user" % address
        if self.args.defer_rcpt and self.args.defer_rcpt in address:
            self.event(f"reply {session.conn_no} 451")
            return "451 4.7.1 <%s>: greylisted, try again later" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.saved += 1
        session.accepted = getattr(session, "accepted", 0) + 1
        name = "-"
        if not self.args.no_save:
            name = f"{self.saved:06d}.eml"
            with open(os.path.join(self.dir, name), "wb") as f:
                # The envelope first, then the message exactly as received.
                f.write(b"X-Envelope-From: " + envelope.mail_from.encode() + b"\r\n")
                for rcpt in envelope.rcpt_tos:
                    f.write(b"X-Envelope-To: " + rcpt.encode() + b"\r\n")
                f.write(envelope.original_content)
        tls = session.ssl or server.transport.get_extra_info("ssl_object") is not None
        self.event(f"msg {session.conn_no} {name} {'tls' if tls else 'plain'}")
        return "250 2.0.0 OK queued"


class CountingSMTP(SMTP):
    def __init__(self, recorder, **kwargs):
        super().__init__(recorder, **kwargs)
        self.recorder = recorder

    def connection_made(self, transport):
        # STARTTLS calls this again on the same session; count TCP connections only.
        if not getattr(self, "_counted", False):
            self._counted = True
            self.recorder.conns += 1
            self.conn_no = self.recorder.conns
            self.recorder.event(f"conn {self.conn_no}")
        super().connection_made(transport)
        self.session.conn_no = self.conn_no


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--tempfail", type=int, default=0)
    p.add_argument("--reject-rcpt")
    p.add_argument("--defer-rcpt")
    p.add_argument("--max-per-conn", type=int, default=0)
    p.add_argument("--implicit-tls", action="store_true")
    p.add_argument("--auth")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--lifetime", type=float, default=600)
    args = p.parse_args()

    recorder = Recorder(args)
    kwargs = dict(hostname="localhost", ident="notifd-test-smtp", decode_data=False)
    server_ssl = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        if args.implicit_tls:
            server_ssl = ctx
        else:
            kwargs.update(tls_context=ctx, require_starttls=True)
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user \
                and auth_data.password.decode() == password
            recorder.event(f"auth {session.conn_no} {'ok' if ok else 'refused'}")
            return AuthResult(success=ok, handled=False)

        kwargs.update(authenticator=authenticator, auth_required=True,
                      auth_require_tls=not args.implicit_tls and bool(args.cert))

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: CountingSMTP(recorder, **kwargs), "127.0.0.1", args.port, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)

    done = loop.create_future()

    def on_stdin():
        if not os.read(sys.stdin.fileno(), 4096) and not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    try:
        await asyncio.wait_for(done, args.lifetime)
    except asyncio.TimeoutError:
        pass
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
