//! The HTTP side's pure part: request bytes → [`Request`], [`Response`] → bytes, the
//! HTML pages and the Prometheus text format (OPERATIONS.md *HTTP side*).
//!
//! It owns the HTTP bounds (head, body, header count, token form), the routing of a
//! path to a [`Route`], the meaning of a form's buttons, and every byte of every page.
//! It must never do I/O, log, keep state between requests or look at the store: the
//! reactor feeds it bytes and plain data (addresses, events, counters) and writes what
//! comes back. So it is where the unit and property tests of the HTTP side live, and
//! [`fuzz`] is its fuzz entry point.
//!
//! One request per connection, always answered with `Connection: close`; bytes after
//! the request are ignored. A request body needs `Content-Length` (no chunked bodies:
//! `Transfer-Encoding` gets 411, so a client can retry with a length). Tokens are
//! checked for form only (charset and length); whether one is genuine is the store's
//! to say. Nothing here ever redirects, and no value reaches a page unescaped.

use std::fmt;
use std::fmt::Write as _;

/// Longest request head (request line and headers), as OPERATIONS.md says: past it, 431.
pub const MAX_HEAD: usize = 8 * 1024;

/// Longest request body: past it, 413.
pub const MAX_BODY: usize = 4 * 1024;

/// Seconds a connection may take to send its whole request before the reactor closes it.
pub const REQUEST_TIMEOUT_SECS: u64 = 10;

/// Headers one request may carry: more gets 431. Browsers send about 20, and a proxy
/// adds a few; the array lives on the stack while parsing.
pub const MAX_HEADERS: usize = 64;

/// Shortest link token: 128 bits in base64url is 22 characters (PROTOCOL.md *Consent*
/// asks for at least 128 bits), so anything shorter cannot be ours.
pub const MIN_TOKEN: usize = 22;

/// Longest link token: room for a token that carries what it stands for (an address and
/// an event) beside its MAC, and still a small fraction of the head bound.
pub const MAX_TOKEN: usize = 512;

/// `Allow` of the confirm and unsubscribe pages.
const ALLOW_FORMS: &str = "GET, HEAD, POST";

/// `Allow` of `/metrics` and `/health`.
const ALLOW_READ: &str = "GET, HEAD";

/// The bounds a request is held to; [`Limits::default`] is OPERATIONS.md's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest head in bytes, its final blank line included.
    pub max_head: usize,
    /// Longest body in bytes.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_head: MAX_HEAD, max_body: MAX_BODY }
    }
}

/// The methods served; any other gets 405.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A page or a reading; changes nothing.
    Get,
    /// As GET, without the body.
    Head,
    /// A button of a page, or RFC 8058's one-click unsubscribe.
    Post,
}

/// A secret from a request: a link token, or the bearer token of `/metrics`. Its
/// `Debug` never shows it, so a logged request never carries it; compare it with the
/// publish token in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What a request's path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/confirm/<token>`: the pending pairs of one confirmation email.
    Confirm(Token),
    /// `/unsubscribe/<token>`: one (address, event) pair.
    Unsubscribe(Token),
    /// `/metrics`: the counters in the Prometheus text format.
    Metrics,
    /// `/health`: whether the store and the mailers answer.
    Health,
}

impl Route {
    /// A name for log lines, without the token.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Confirm(_) => "confirm",
            Route::Unsubscribe(_) => "unsubscribe",
            Route::Metrics => "metrics",
            Route::Health => "health",
        }
    }

    fn allow(&self) -> &'static str {
        match self {
            Route::Confirm(_) | Route::Unsubscribe(_) => ALLOW_FORMS,
            Route::Metrics | Route::Health => ALLOW_READ,
        }
    }
}

/// The form fields of a POST body that mean something here; all others are ignored.
/// The page buttons send `confirm=1`, `unsubscribe=1` and `all=1`; RFC 8058's one-click
/// POST sends `List-Unsubscribe=One-Click` and counts as the unsubscribe button.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Form {
    /// `confirm=1`: the confirm page's button.
    pub confirm: bool,
    /// `unsubscribe=1`: the unsubscribe page's button.
    pub unsubscribe: bool,
    /// `List-Unsubscribe=One-Click`: RFC 8058's one-click unsubscribe.
    pub one_click: bool,
    /// `all=1`: the "stop all email to this address" button.
    pub all: bool,
}

/// One whole request, owning the little it keeps of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET, HEAD or POST, allowed for the route.
    pub method: Method,
    /// The path's meaning.
    pub route: Route,
    /// A POST's button fields (all false for GET and HEAD).
    pub form: Form,
    /// It carries `Forwarded`, `X-Forwarded-For` or `X-Real-IP`: it came through a proxy,
    /// so a loopback peer says nothing about who sent it, and it is never trusted for that.
    pub proxied: bool,
    /// The token of `Authorization: Bearer <token>`, if any.
    pub bearer: Option<Token>,
    /// Bytes of the buffer the request took, head and body.
    pub len: usize,
}

/// What the reactor has to do for a request: one arm per page or reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Show the pending events of this confirmation; change nothing.
    ConfirmPage(&'a Token),
    /// Confirm them (the confirm button).
    Confirm(&'a Token),
    /// Show the address and event of this link; change nothing.
    UnsubscribePage(&'a Token),
    /// Remove that pair (the unsubscribe button, or RFC 8058's one-click POST).
    Unsubscribe(&'a Token),
    /// Opt the address out of everything (the stop-all button).
    OptOut(&'a Token),
    /// The Prometheus text, if the request is allowed to read it.
    Metrics,
    /// The health of the store and the mailers.
    Health,
}

impl Request {
    /// What to do. A POST here always carries its button, [`parse`] saw to that; when a
    /// form carries both unsubscribe buttons, stopping all email wins.
    pub fn action(&self) -> Action<'_> {
        match (&self.route, self.method) {
            (Route::Confirm(t), Method::Get | Method::Head) => Action::ConfirmPage(t),
            (Route::Confirm(t), Method::Post) => Action::Confirm(t),
            (Route::Unsubscribe(t), Method::Get | Method::Head) => Action::UnsubscribePage(t),
            (Route::Unsubscribe(t), Method::Post) if self.form.all => Action::OptOut(t),
            (Route::Unsubscribe(t), Method::Post) => Action::Unsubscribe(t),
            (Route::Metrics, _) => Action::Metrics,
            (Route::Health, _) => Action::Health,
        }
    }

    /// Whether the response goes without its body.
    pub fn is_head(&self) -> bool {
        self.method == Method::Head
    }
}

/// The statuses this side answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200: a page, the metrics, a healthy `/health`.
    Ok,
    /// 400: a malformed request, or a POST without its button.
    BadRequest,
    /// 403: `/metrics` without the right bearer token.
    Forbidden,
    /// 404: an unknown path, or a token that is malformed or forged.
    NotFound,
    /// 405: a method the path does not take (with `Allow`).
    MethodNotAllowed,
    /// 411: a body without `Content-Length`.
    LengthRequired,
    /// 413: a body over the bound.
    PayloadTooLarge,
    /// 415: a body that is no HTML form.
    UnsupportedMediaType,
    /// 431: a head over the bound, or too many headers.
    HeaderFieldsTooLarge,
    /// 500: the store reported an error for a page's question.
    InternalServerError,
    /// 503: `/health` when the store or a mailer does not answer, a page whose store
    /// request timed out, or `http_max_clients` reached.
    ServiceUnavailable,
}

impl Status {
    /// The three-digit code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::LengthRequired => 411,
            Status::PayloadTooLarge => 413,
            Status::UnsupportedMediaType => 415,
            Status::HeaderFieldsTooLarge => 431,
            Status::InternalServerError => 500,
            Status::ServiceUnavailable => 503,
        }
    }

    /// The reason phrase of the status line.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::LengthRequired => "Length Required",
            Status::PayloadTooLarge => "Content Too Large",
            Status::UnsupportedMediaType => "Unsupported Media Type",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::InternalServerError => "Internal Server Error",
            Status::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// A request refused before the reactor sees it; [`HttpError::response`] is the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpError {
    /// The status to answer with.
    pub status: Status,
    /// Why, for the error page and the log (never a token).
    pub reason: &'static str,
    /// The methods the path takes, for a 405.
    pub allow: Option<&'static str>,
    /// The request was a HEAD: answer without the body.
    pub head: bool,
}

impl HttpError {
    /// The page that answers it.
    pub fn response(&self) -> Response {
        let mut r = match self.status {
            Status::NotFound => not_found_page(),
            _ => error_page(self.status, self.reason),
        };
        r.allow = self.allow;
        r
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.code(), self.reason)
    }
}

impl std::error::Error for HttpError {}

/// Parses the request at the start of `buf`, which grows as bytes arrive.
///
/// `Ok(None)`: not enough bytes yet; call again with more. `Ok(Some(_))` and `Err(_)` are
/// final, and stay the same for any longer `buf` with the same start. With
/// `buf.len() >= limits.max_head + limits.max_body` the answer is always final, so a
/// reactor may cap the buffer there. Stateless: each call parses from the start (the
/// reactor should use [`RequestReader`], which skips calls that cannot finish).
///
/// Bounds and framing (400, 411, 413, 431) are answered as soon as the head is whole;
/// the route, method and form (404, 405, 415, a POST without its button's 400) once
/// the body is there too, so a client sending a small body gets its answer after
/// sending it.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<Request>, HttpError> {
    match parse_step(buf, limits)? {
        Step::Done(req) => Ok(Some(req)),
        Step::NeedHead | Step::NeedBody(_) => Ok(None),
    }
}

enum Step {
    /// The head is not whole yet.
    NeedHead,
    /// The head is whole; the body ends at this length of the buffer.
    NeedBody(usize),
    /// The request is whole (and bytes may follow it).
    Done(Request),
}

fn parse_step(buf: &[u8], limits: &Limits) -> Result<Step, HttpError> {
    let window = &buf[..buf.len().min(limits.max_head)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(window);
    let head = req.method == Some("HEAD");
    let err = |status, reason| HttpError { status, reason, allow: None, head };
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if window.len() < limits.max_head => return Ok(Step::NeedHead),
        Ok(httparse::Status::Partial) => {
            return Err(err(Status::HeaderFieldsTooLarge, "request head too long"))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(err(Status::HeaderFieldsTooLarge, "too many header fields"))
        }
        Err(_) => return Err(err(Status::BadRequest, "malformed request")),
    };
    let fields = Fields::read(req.headers, req.version == Some(1)).map_err(|(s, r)| err(s, r))?;
    if fields.content_length > limits.max_body {
        return Err(err(Status::PayloadTooLarge, "request body too long"));
    }
    let end = head_len + fields.content_length;
    let Some(body) = buf.get(head_len..end) else { return Ok(Step::NeedBody(end)) };

    let path = req.path.unwrap_or("");
    let route = route(path).ok_or(err(Status::NotFound, "no such page"))?;
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" if matches!(route, Route::Confirm(_) | Route::Unsubscribe(_)) => Method::Post,
        _ => {
            let reason = "method not allowed here";
            return Err(HttpError { allow: Some(route.allow()), ..err(Status::MethodNotAllowed, reason) });
        }
    };
    let mut form = Form::default();
    if method == Method::Post {
        form = read_form(body, fields.content_type).map_err(|(s, r)| err(s, r))?;
        let pressed = match route {
            Route::Confirm(_) => form.confirm,
            Route::Unsubscribe(_) => form.unsubscribe || form.one_click || form.all,
            Route::Metrics | Route::Health => false,
        };
        if !pressed {
            return Err(err(Status::BadRequest, "nothing was changed: the form did not carry its button"));
        }
    }
    Ok(Step::Done(Request { method, route, form, proxied: fields.proxied, bearer: fields.bearer, len: end }))
}

/// Parses requests incrementally for one connection: between calls it remembers how far
/// it looked for the end of the head and how long the body is, so a client sending one
/// byte at a time costs a scan of each byte once, not a parse of the whole head each
/// time. Its answers are [`parse`]'s, but a head that goes wrong after the first bytes
/// may be answered only once its blank line (or the head bound) arrives: the first
/// bytes are always parsed, so what is not HTTP at all (a TLS handshake on the plain
/// port) is answered at once rather than at the timeout.
#[derive(Debug, Default, Clone)]
pub struct RequestReader {
    /// Bytes already scanned for the end of the head.
    scanned: usize,
    /// Once the head is whole: the buffer length at which the body is whole.
    need: Option<usize>,
}

impl RequestReader {
    /// A reader for a new connection.
    pub fn new() -> RequestReader {
        RequestReader::default()
    }

    /// As [`parse`], for a `buf` that only ever grows between calls.
    pub fn read(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<Request>, HttpError> {
        match self.need {
            Some(need) if buf.len() < need => return Ok(None),
            Some(_) => {}
            None => {
                let window = &buf[..buf.len().min(limits.max_head)];
                // A head ends with an empty line: LF LF or LF CR LF (httparse takes both).
                // The longest end marker is 3 bytes: look 2 back so none is split.
                let from = self.scanned.saturating_sub(2).min(window.len());
                let ended = has_blank_line(&window[from..]);
                let first = self.scanned == 0;
                self.scanned = window.len();
                if !ended && !first && window.len() < limits.max_head {
                    return Ok(None);
                }
            }
        }
        match parse_step(buf, limits)? {
            Step::Done(req) => Ok(Some(req)),
            Step::NeedBody(need) => {
                self.need = Some(need);
                Ok(None)
            }
            Step::NeedHead => Ok(None),
        }
    }
}

fn has_blank_line(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

/// The header fields that matter here, each checked once.
struct Fields<'b> {
    content_length: usize,
    content_type: Option<&'b [u8]>,
    proxied: bool,
    bearer: Option<Token>,
}

impl<'b> Fields<'b> {
    fn read(headers: &[httparse::Header<'b>], http11: bool) -> Result<Fields<'b>, (Status, &'static str)> {
        let mut f = Fields { content_length: 0, content_type: None, proxied: false, bearer: None };
        let (mut hosts, mut lengths, mut types, mut auths) = (0, 0, 0, 0);
        for h in headers {
            let name = h.name;
            let value = trim(h.value);
            if name.eq_ignore_ascii_case("host") {
                hosts += 1;
            } else if name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                f.content_length = content_length(value)?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err((
                    Status::LengthRequired,
                    "a body needs Content-Length; chunked bodies are not taken",
                ));
            } else if name.eq_ignore_ascii_case("content-type") {
                types += 1;
                f.content_type = Some(value);
            } else if name.eq_ignore_ascii_case("authorization") {
                auths += 1;
                f.bearer = bearer(value);
            } else if name.eq_ignore_ascii_case("forwarded")
                || name.eq_ignore_ascii_case("x-forwarded-for")
                || name.eq_ignore_ascii_case("x-real-ip")
            {
                f.proxied = true;
            }
        }
        // Two of a field that says where the body ends or who is asking are how
        // requests are smuggled past a proxy: refuse rather than pick one.
        if lengths > 1 || types > 1 || auths > 1 || hosts > 1 {
            return Err((Status::BadRequest, "a header field that must come once came twice"));
        }
        if http11 && hosts == 0 {
            return Err((Status::BadRequest, "an HTTP/1.1 request needs a Host field"));
        }
        Ok(f)
    }
}

fn content_length(value: &[u8]) -> Result<usize, (Status, &'static str)> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err((Status::BadRequest, "malformed Content-Length"));
    }
    // Any length too long to count is too long to take.
    Ok(value
        .iter()
        .try_fold(0usize, |n, d| n.checked_mul(10)?.checked_add(usize::from(d - b'0')))
        .unwrap_or(usize::MAX))
}

/// `Bearer <token>` (scheme in any case); other schemes and non-token bytes are no bearer.
fn bearer(value: &[u8]) -> Option<Token> {
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = trim(&value[7..]);
    let ok = !token.is_empty() && token.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| Token(String::from_utf8_lossy(token).into_owned()))
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The route of a request target; `None` is a 404. The query is ignored, an absolute
/// form (`http://host/path`, as a proxy may send) is taken by its path, and no
/// percent-decoding is done: our paths and tokens never need it.
fn route(target: &str) -> Option<Route> {
    let path = match target.strip_prefix("http://").or_else(|| target.strip_prefix("https://")) {
        Some(rest) => &rest[rest.find('/')?..],
        None => target,
    };
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match path {
        "/metrics" => Some(Route::Metrics),
        "/health" => Some(Route::Health),
        _ => {
            if let Some(t) = path.strip_prefix("/confirm/") {
                Some(Route::Confirm(token(t)?))
            } else {
                Some(Route::Unsubscribe(token(path.strip_prefix("/unsubscribe/")?)?))
            }
        }
    }
}

/// A link token of the right form: base64url's alphabet (which also holds hex and
/// base32, and Crockford's dashes), [`MIN_TOKEN`] to [`MAX_TOKEN`] characters.
fn token(t: &str) -> Option<Token> {
    let ok = (MIN_TOKEN..=MAX_TOKEN).contains(&t.len())
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| Token(t.to_owned()))
}

/// The button fields of a POST body: `application/x-www-form-urlencoded` or
/// `multipart/form-data` (RFC 8058 allows both). An empty body has no fields whatever
/// its type.
fn read_form(body: &[u8], content_type: Option<&[u8]>) -> Result<Form, (Status, &'static str)> {
    let mut form = Form::default();
    if body.is_empty() {
        return Ok(form);
    }
    let not_a_form = (Status::UnsupportedMediaType, "the body is not an HTML form");
    let ct = content_type.ok_or(not_a_form)?;
    let mut params = ct.split(|&b| b == b';');
    let media = trim(params.next().unwrap_or_default());
    if media.eq_ignore_ascii_case(b"application/x-www-form-urlencoded") {
        for pair in body.split(|&b| b == b'&') {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            form.set(|want| urlencoded_is(name, want), |want| urlencoded_is(value, want));
        }
        Ok(form)
    } else if media.eq_ignore_ascii_case(b"multipart/form-data") {
        let boundary = params.find_map(|p| param(p, b"boundary"));
        let boundary = boundary.ok_or((Status::BadRequest, "multipart body without a boundary"))?;
        multipart(body, boundary, &mut form)?;
        Ok(form)
    } else {
        Err(not_a_form)
    }
}

impl Form {
    fn set(&mut self, name_is: impl Fn(&[u8]) -> bool, value_is: impl Fn(&[u8]) -> bool) {
        if name_is(b"confirm") && value_is(b"1") {
            self.confirm = true;
        } else if name_is(b"unsubscribe") && value_is(b"1") {
            self.unsubscribe = true;
        } else if name_is(b"all") && value_is(b"1") {
            self.all = true;
        } else if name_is(b"List-Unsubscribe") && value_is(b"One-Click") {
            self.one_click = true;
        }
    }
}

/// Whether urlencoded `raw` decodes to `want`, decoding on the fly rather than into a
/// buffer. A broken escape matches nothing.
fn urlencoded_is(raw: &[u8], want: &[u8]) -> bool {
    let mut want = want.iter();
    let mut i = 0;
    while i < raw.len() {
        let b = match raw[i] {
            b'+' => b' ',
            b'%' => {
                let hex = |j: usize| raw.get(j).and_then(|&c| (c as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else { return false };
                i += 2;
                (hi * 16 + lo) as u8
            }
            b => b,
        };
        if want.next() != Some(&b) {
            return false;
        }
        i += 1;
    }
    want.next().is_none()
}

/// The value of parameter `key` in `key=value` or `key="value"` (RFC 2045's form; no
/// escapes inside quotes, which boundaries and our field names never need).
fn param<'a>(p: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let p = trim(p);
    let eq = p.iter().position(|&b| b == b'=')?;
    if !trim(&p[..eq]).eq_ignore_ascii_case(key) {
        return None;
    }
    let v = trim(&p[eq + 1..]);
    match v {
        [b'"', inner @ ..] => inner.split(|&b| b == b'"').next(),
        _ => Some(v),
    }
}

/// The fields of a `multipart/form-data` body (RFC 7578): parts between `--boundary`
/// lines ended by CRLF, each with a `Content-Disposition: form-data; name="…"` header;
/// the preamble and epilogue are ignored.
fn multipart(body: &[u8], boundary: &[u8], form: &mut Form) -> Result<(), (Status, &'static str)> {
    let bad = (Status::BadRequest, "malformed multipart body");
    if boundary.is_empty() || boundary.len() > 70 {
        return Err(bad);
    }
    let mut delimiter = Vec::with_capacity(boundary.len() + 4);
    delimiter.extend_from_slice(b"\r\n--");
    delimiter.extend_from_slice(boundary);
    let mut rest = match body.strip_prefix(&delimiter[2..]) {
        Some(rest) => rest,
        None => &body[find(body, &delimiter).ok_or(bad)? + delimiter.len()..],
    };
    loop {
        if rest.starts_with(b"--") {
            return Ok(());
        }
        let mut line_end = rest;
        while let [b' ' | b'\t', r @ ..] = line_end {
            line_end = r;
        }
        let part_and_more = line_end.strip_prefix(b"\r\n").ok_or(bad)?;
        let end = find(part_and_more, &delimiter).ok_or(bad)?;
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let (content, headers) = match httparse::parse_headers(&part_and_more[..end], &mut headers) {
            Ok(httparse::Status::Complete((n, headers))) => (&part_and_more[n..end], headers),
            _ => return Err(bad),
        };
        let disposition = headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-disposition"));
        if let Some(d) = disposition {
            let mut params = d.value.split(|&b| b == b';');
            if trim(params.next().unwrap_or_default()).eq_ignore_ascii_case(b"form-data") {
                if let Some(name) = params.find_map(|p| param(p, b"name")) {
                    form.set(|want| name == want, |want| content == want);
                }
            }
        }
        rest = &part_and_more[end + delimiter.len()..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The type of a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// A page: `text/html; charset=utf-8`.
    Html,
    /// `/health`: `text/plain; charset=utf-8`.
    Text,
    /// `/metrics`: the Prometheus text format 0.0.4.
    Prometheus,
}

impl ContentType {
    fn as_str(self) -> &'static str {
        match self {
            ContentType::Html => "text/html; charset=utf-8",
            ContentType::Text => "text/plain; charset=utf-8",
            ContentType::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// A whole response; [`Response::encode`] makes its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: Status,
    /// The body's type.
    pub content_type: ContentType,
    /// `Allow`, for a 405.
    pub allow: Option<&'static str>,
    /// The body (left out for HEAD, its length still sent).
    pub body: String,
}

impl Response {
    /// Appends the response to `out`: HTTP/1.1, `Connection: close`, `Content-Length`,
    /// `Date` from `now` (Unix seconds), and on every response the headers that keep a
    /// page out of caches, frames and other sites' referrers. `head`: the request was a
    /// HEAD, so the same headers go without the body.
    pub fn encode(&self, head: bool, now: i64, out: &mut Vec<u8>) {
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(n.format(self.status.code()).as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.status.reason().as_bytes());
        out.extend_from_slice(b"\r\nDate: ");
        imf_fixdate(now, out);
        out.extend_from_slice(b"\r\nContent-Type: ");
        out.extend_from_slice(self.content_type.as_str().as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(n.format(self.body.len()).as_bytes());
        if let Some(allow) = self.allow {
            out.extend_from_slice(b"\r\nAllow: ");
            out.extend_from_slice(allow.as_bytes());
        }
        out.extend_from_slice(
            b"\r\nConnection: close\
              \r\nCache-Control: no-store\
              \r\nReferrer-Policy: no-referrer\
              \r\nX-Frame-Options: DENY\
              \r\nX-Content-Type-Options: nosniff\
              \r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; form-action 'self'\
              \r\n\r\n",
        );
        if !head {
            out.extend_from_slice(self.body.as_bytes());
        }
    }
}

/// HTTP's date (RFC 9110's IMF-fixdate): `Sun, 06 Nov 1994 08:49:37 GMT`.
fn imf_fixdate(secs: i64, out: &mut Vec<u8>) {
    let secs = secs.max(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let mut s = String::with_capacity(29);
    let _ = write!(
        s,
        "{}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    out.extend_from_slice(s.as_bytes());
}

// ---- pages ------------------------------------------------------------------------

/// Appends `s` with HTML's five special characters escaped, for text and for quoted
/// attribute values alike.
pub fn escape_html(out: &mut String, s: &str) {
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let rep = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#39;",
            _ => continue,
        };
        out.push_str(&s[last..i]);
        out.push_str(rep);
        last = i + 1;
    }
    out.push_str(&s[last..]);
}

/// A page in the one template: a title and the body that `fill` writes. Plain HTML, no
/// script, no external resource, a little inline CSS.
fn page(status: Status, title: &str, fill: impl FnOnce(&mut String)) -> Response {
    let mut b = String::with_capacity(1536);
    b.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>",
    );
    escape_html(&mut b, title);
    b.push_str(
        "</title><style>\
         body{font:1rem/1.5 system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;color:#222;background:#fff}\
         h1{font-size:1.4rem}code{background:#f2f2f2;padding:0 .2em;overflow-wrap:anywhere}\
         strong{overflow-wrap:anywhere}button{font:inherit;padding:.4rem 1rem;margin:.3rem 0;cursor:pointer}\
         .quiet{color:#555;font-size:.9rem}</style></head>\n<body><main><h1>",
    );
    escape_html(&mut b, title);
    b.push_str("</h1>\n");
    fill(&mut b);
    b.push_str("</main></body></html>\n");
    Response { status, content_type: ContentType::Html, allow: None, body: b }
}

fn address(b: &mut String, address: &str) {
    b.push_str("<strong>");
    escape_html(b, address);
    b.push_str("</strong>");
}

/// "`before` **addr** `verb` an email each time one of these events happens:" and the
/// events, one per line.
fn address_and_events(b: &mut String, (before, addr, verb): (&str, &str, &str), events: &[&str]) {
    b.push_str(before);
    address(b, addr);
    b.push_str(verb);
    b.push_str(" an email each time one of these events happens:</p>\n<ul>\n");
    for e in events {
        b.push_str("<li><code>");
        escape_html(b, e);
        b.push_str("</code></li>\n");
    }
    b.push_str("</ul>\n");
}

/// A form posting back to the page's own URL (so the token never has to be written
/// into the page) with one button per `(field, label)`; the field's value is `1`.
fn buttons(b: &mut String, fields: &[(&str, &str)]) {
    b.push_str("<form method=\"post\">\n");
    for (field, label) in fields {
        let _ = writeln!(b, "<p><button type=\"submit\" name=\"{field}\" value=\"1\">{label}</button></p>");
    }
    b.push_str("</form>\n");
}

fn nothing_to_confirm(addr: &str) -> Response {
    page(Status::Ok, "Nothing to confirm", |b| {
        b.push_str("<p>No subscription of ");
        address(b, addr);
        b.push_str(
            " is waiting for this confirmation: it was confirmed already, or it was not confirmed \
             in time and has been deleted.</p>\n",
        );
    })
}

/// The page of `GET /confirm/<token>`: the pending events that confirmation covers and
/// its Confirm button; with no events (confirmed already, or expired), a page saying so.
pub fn confirm_page(addr: &str, events: &[&str]) -> Response {
    if events.is_empty() {
        return nothing_to_confirm(addr);
    }
    page(Status::Ok, "Confirm email notifications", |b| {
        address_and_events(b, ("<p>Someone asked that ", addr, " receive"), events);
        buttons(b, &[("confirm", "Confirm")]);
        b.push_str(
            "<p class=\"quiet\">If you did not ask for this, close this page: nothing is sent to \
             this address without a confirmation, and nothing has changed.</p>\n",
        );
    })
}

/// The page of `POST /confirm/<token>`: the events now confirmed; with none, the same
/// page as [`confirm_page`] without events.
pub fn confirmed_page(addr: &str, events: &[&str]) -> Response {
    if events.is_empty() {
        return nothing_to_confirm(addr);
    }
    page(Status::Ok, "Subscription confirmed", |b| {
        address_and_events(b, ("<p>", addr, " will receive"), events);
        b.push_str("<p class=\"quiet\">Every such email carries a link to stop it.</p>\n");
    })
}

/// The page of `GET /unsubscribe/<token>`: the address and event, the Unsubscribe
/// button and the stop-all button.
pub fn unsubscribe_page(addr: &str, event: &str) -> Response {
    page(Status::Ok, "Unsubscribe", |b| {
        b.push_str("<p>Stop the emails about <code>");
        escape_html(b, event);
        b.push_str("</code> to ");
        address(b, addr);
        b.push_str("?</p>\n");
        buttons(b, &[("unsubscribe", "Unsubscribe"), ("all", "Stop all email to this address")]);
        b.push_str(
            "<p class=\"quiet\">The second button also ends every other subscription of this \
             address, and no confirmation email will be sent to it again. Nothing changes until \
             you press a button.</p>\n",
        );
    })
}

/// The page of the Unsubscribe button's POST (and of RFC 8058's one-click POST); it
/// still offers the stop-all button.
pub fn unsubscribed_page(addr: &str, event: &str) -> Response {
    page(Status::Ok, "Unsubscribed", |b| {
        b.push_str("<p>");
        address(b, addr);
        b.push_str(" will receive no more email about <code>");
        escape_html(b, event);
        b.push_str("</code>.</p>\n");
        buttons(b, &[("all", "Stop all email to this address")]);
    })
}

/// The page of `GET /unsubscribe/<token>` when the link's pair is no longer stored (the
/// link was used, or the address unsubscribed otherwise): saying so, and still offering
/// the stop-all button. The token does not say the event to a page that has no pair.
pub fn not_subscribed_page(addr: &str) -> Response {
    page(Status::Ok, "Already unsubscribed", |b| {
        b.push_str("<p>");
        address(b, addr);
        b.push_str(" no longer receives the emails this link stops.</p>\n");
        buttons(b, &[("all", "Stop all email to this address")]);
    })
}

/// The page of `GET /unsubscribe/<token>` for a confirmation email's stop-all link: the
/// address, its stored events, and the stop-all button.
pub fn optout_page(addr: &str, events: &[&str]) -> Response {
    page(Status::Ok, "Stop all email", |b| {
        b.push_str("<p>Stop all email from this server to ");
        address(b, addr);
        b.push_str("?</p>\n");
        if !events.is_empty() {
            b.push_str("<p>This ends its subscriptions to:</p>\n<ul>\n");
            for e in events {
                b.push_str("<li><code>");
                escape_html(b, e);
                b.push_str("</code></li>\n");
            }
            b.push_str("</ul>\n");
        }
        buttons(b, &[("all", "Stop all email to this address")]);
        b.push_str(
            "<p class=\"quiet\">No confirmation email will be sent to it again. Nothing changes \
             until you press the button.</p>\n",
        );
    })
}

/// The page of the stop-all button's POST.
pub fn opted_out_page(addr: &str) -> Response {
    page(Status::Ok, "All email stopped", |b| {
        b.push_str("<p>");
        address(b, addr);
        b.push_str(
            " will receive no more email from this server: its subscriptions were removed, and no \
             confirmation email will be sent to it again.</p>\n",
        );
    })
}

/// The 404 page: an unknown path, or a link token that is malformed, forged or no
/// longer valid (one page for all, so it tells nothing about anyone's data).
pub fn not_found_page() -> Response {
    page(Status::NotFound, "Link not valid", |b| {
        b.push_str(
            "<p>This link is not valid, or no longer is. If you copied it from an email, check \
             that the whole link was copied: some email programs cut long lines.</p>\n",
        );
    })
}

/// A page for any other refusal or failure: the status and one sentence (`text` may
/// start in lower case, as a log line's reason does).
pub fn error_page(status: Status, text: &str) -> Response {
    page(status, status.reason(), |b| {
        b.push_str("<p>");
        let mut chars = text.chars();
        if let Some(first) = chars.next() {
            escape_html(b, first.to_ascii_uppercase().encode_utf8(&mut [0; 4]));
        }
        escape_html(b, chars.as_str());
        b.push_str(".</p>\n");
    })
}

/// The answer of `/health`: 200 `ok` when nothing is `down`, else 503 naming what does
/// not answer (`down: store, mailer 2`).
pub fn health(down: &[&str]) -> Response {
    let (status, body) = if down.is_empty() {
        (Status::Ok, "ok".to_owned())
    } else {
        (Status::ServiceUnavailable, format!("down: {}", down.join(", ")))
    };
    Response { status, content_type: ContentType::Text, allow: None, body }
}

// ---- metrics ----------------------------------------------------------------------

/// A Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only ever goes up (until a restart).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One number of `/metrics` (and of STATS, under the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The name without the `notifd_` prefix: `[a-z_][a-z0-9_]*`.
    pub name: &'static str,
    /// One line saying what it counts.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// Its value now.
    pub value: u64,
}

/// Appends `metrics` in the Prometheus text format 0.0.4: for each, `# HELP`, `# TYPE`
/// and the sample, named `notifd_<name>`.
pub fn encode_metrics(out: &mut String, metrics: &[Metric]) {
    for m in metrics {
        debug_assert!(
            m.name
                .bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_lowercase() || b == b'_' || (i > 0 && b.is_ascii_digit())),
            "metric name {:?}",
            m.name
        );
        out.push_str("# HELP notifd_");
        out.push_str(m.name);
        out.push(' ');
        // The format's only escapes in HELP: backslash and line feed.
        for c in m.help.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push_str("\n# TYPE notifd_");
        out.push_str(m.name);
        out.push_str(match m.kind {
            MetricKind::Counter => " counter\n",
            MetricKind::Gauge => " gauge\n",
        });
        out.push_str("notifd_");
        out.push_str(m.name);
        out.push(' ');
        out.push_str(itoa::Buffer::new().format(m.value));
        out.push('\n');
    }
}

/// The answer of an allowed `GET /metrics`.
pub fn metrics_response(metrics: &[Metric]) -> Response {
    let mut body = String::with_capacity(metrics.len() * 128);
    encode_metrics(&mut body, metrics);
    Response { status: Status::Ok, content_type: ContentType::Prometheus, allow: None, body }
}

/// The answer of `/metrics` without the right bearer token (or through a proxy).
pub fn forbidden() -> Response {
    error_page(Status::Forbidden, "Reading the metrics needs Authorization: Bearer with the publish token")
}

// ---- fuzzing ----------------------------------------------------------------------

/// The fuzz entry point (for a cargo-fuzz target): `data[0]` picks a chunk size, the rest
/// is a request fed in such chunks to a [`RequestReader`]. Panics if the reader and
/// [`parse`] disagree, if an answer changes as bytes arrive, or if a buffer at the bound
/// gets no answer; encodes whatever answer comes.
pub fn fuzz(data: &[u8]) {
    let Some((&chunk, bytes)) = data.split_first() else { return };
    let chunk = usize::from(chunk.max(1));
    let limits = Limits { max_head: 256, max_body: 128 };
    let mut reader = RequestReader::new();
    let mut answer = None;
    let mut end = 0;
    while end < bytes.len() && answer.is_none() {
        end = (end + chunk).min(bytes.len());
        let got = reader.read(&bytes[..end], &limits);
        if !matches!(got, Ok(None)) {
            assert_eq!(got, parse(&bytes[..end], &limits), "reader and parse disagree");
            answer = Some(got);
        }
    }
    let whole = parse(bytes, &limits);
    if let Some(got) = &answer {
        assert_eq!(got, &whole, "an answer changed as bytes arrived");
    }
    if bytes.len() >= limits.max_head + limits.max_body {
        assert!(!matches!(whole, Ok(None)), "a buffer at the bound got no answer");
    }
    // The bytes stand in for an address and an event, so the pages' escaping is fuzzed too.
    let text = String::from_utf8_lossy(bytes);
    let response = match whole {
        Ok(Some(req)) => match req.action() {
            Action::ConfirmPage(_) => confirm_page(&text, &[&text]),
            Action::Confirm(_) => confirmed_page(&text, &[&text]),
            Action::UnsubscribePage(_) => unsubscribe_page(&text, &text),
            Action::Unsubscribe(_) => unsubscribed_page(&text, &text),
            Action::OptOut(_) => opted_out_page(&text),
            Action::Metrics => forbidden(),
            Action::Health => health(&[&text]),
        },
        Ok(None) => return,
        Err(e) => e.response(),
    };
    // No page of ours has a script, so one in a page came from the input.
    assert!(!response.body.contains("<script"), "a value reached a page unescaped");
    let mut out = Vec::new();
    response.encode(false, 0, &mut out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOK: &str = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA";

    fn req(s: &str) -> Result<Option<Request>, HttpError> {
        parse(s.as_bytes(), &Limits::default())
    }

    fn ok(s: &str) -> Request {
        req(s).unwrap().unwrap_or_else(|| panic!("incomplete: {s:?}"))
    }

    fn status(s: &str) -> Status {
        req(s).unwrap_err().status
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: notifd.example\r\n\r\n")
    }

    fn post(path: &str, content_type: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nHost: notifd.example\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    const URLENCODED: &str = "application/x-www-form-urlencoded";

    fn token() -> Token {
        Token(TOK.to_owned())
    }

    fn bytes(r: &Response, head: bool) -> String {
        let mut out = Vec::new();
        r.encode(head, 784_111_777, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_get_of_each_route() {
        let r = ok(&get(&format!("/confirm/{TOK}")));
        let s = get(&format!("/confirm/{TOK}"));
        assert_eq!(
            r,
            Request {
                method: Method::Get,
                route: Route::Confirm(token()),
                form: Form::default(),
                proxied: false,
                bearer: None,
                len: s.len(),
            }
        );
        assert_eq!(r.action(), Action::ConfirmPage(&token()));
        let r = ok(&get(&format!("/unsubscribe/{TOK}")));
        assert_eq!(r.action(), Action::UnsubscribePage(&token()));
        assert_eq!(ok(&get("/metrics")).action(), Action::Metrics);
        assert_eq!(ok(&get("/health")).action(), Action::Health);
        // The query is ignored; an absolute form is taken by its path.
        assert_eq!(ok(&get("/health?x=1")).route, Route::Health);
        assert_eq!(ok(&get(&format!("/confirm/{TOK}?utm_source=mail"))).route, Route::Confirm(token()));
        assert_eq!(ok(&get("http://notifd.example/metrics")).route, Route::Metrics);
        assert_eq!(ok(&get("https://notifd.example:8443/health")).route, Route::Health);
        // HTTP/1.0 needs no Host; bytes after the request are not ours.
        let r = ok("GET /health HTTP/1.0\r\n\r\nGET /metrics HTTP/1.0\r\n\r\n");
        assert_eq!((r.route, r.len), (Route::Health, 24));
        // Empty lines before the request line are skipped, as RFC 9112 allows.
        assert_eq!(ok("\r\n\r\nGET /health HTTP/1.1\r\nHost: h\r\n\r\n").route, Route::Health);
    }

    #[test]
    fn unknown_paths_and_malformed_tokens_are_404() {
        let long = "a".repeat(MAX_TOKEN + 1);
        let short = "a".repeat(MIN_TOKEN - 1);
        for path in [
            "/",
            "/metrics/",
            "/Metrics",
            "/healthz",
            "/confirm/",
            "/confirm",
            &format!("/confirm/{TOK}/"),
            &format!("/confirm/{TOK}%20"),
            &format!("/confirm/{short}"),
            &format!("/confirm/{long}"),
            &format!("/unsubscribe/{TOK}.x"),
            &format!("/unsubscribe//{TOK}"),
            &format!("/confirm/../unsubscribe/{TOK}"),
            "*",
            "http://notifd.example",
        ] {
            let e = req(&get(path)).unwrap_err();
            assert_eq!((e.status, e.head, e.allow), (Status::NotFound, false, None), "{path}");
        }
        let min = "a".repeat(MIN_TOKEN);
        let max = "Az09-_".repeat(MAX_TOKEN / 6 + 1)[..MAX_TOKEN].to_owned();
        assert_eq!(ok(&get(&format!("/confirm/{min}"))).route, Route::Confirm(Token(min)));
        assert_eq!(ok(&get(&format!("/unsubscribe/{max}"))).route, Route::Unsubscribe(Token(max)));
        // Crockford's base32 with dashes is of the right form too.
        assert!(req(&get("/confirm/7KQ2-M4XH-9TZB-7KQ2-M4XH-9TZB")).is_ok());
    }

    #[test]
    fn other_methods_are_405_with_allow() {
        for (m, path, allow) in [
            ("PUT", format!("/confirm/{TOK}"), "GET, HEAD, POST"),
            ("DELETE", format!("/unsubscribe/{TOK}"), "GET, HEAD, POST"),
            ("OPTIONS", "/health".to_owned(), "GET, HEAD"),
            ("POST", "/metrics".to_owned(), "GET, HEAD"),
            ("POST", "/health".to_owned(), "GET, HEAD"),
            ("get", "/health".to_owned(), "GET, HEAD"),
        ] {
            let e = req(&format!("{m} {path} HTTP/1.1\r\nHost: h\r\n\r\n")).unwrap_err();
            assert_eq!((e.status, e.allow), (Status::MethodNotAllowed, Some(allow)), "{m} {path}");
            let out = bytes(&e.response(), e.head);
            assert!(out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{out}");
            assert!(out.contains(&format!("\r\nAllow: {allow}\r\n")), "{out}");
        }
        // An unknown path stays a 404 whatever the method.
        assert_eq!(status("PUT /nowhere HTTP/1.1\r\nHost: h\r\n\r\n"), Status::NotFound);
    }

    #[test]
    fn head_is_get_without_the_body() {
        let r = ok(&format!("HEAD /unsubscribe/{TOK} HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(r.is_head());
        assert_eq!(r.action(), Action::UnsubscribePage(&token()));
        let page = unsubscribe_page("ana@example.com", "orders");
        let (full, head) = (bytes(&page, false), bytes(&page, true));
        let (head_of_full, body) = full.split_once("\r\n\r\n").unwrap();
        assert_eq!(head, format!("{head_of_full}\r\n\r\n"));
        assert_eq!(body, page.body);
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", page.body.len())));
        // A refused HEAD is answered without a body too.
        let e = req("HEAD /nowhere HTTP/1.1\r\nHost: h\r\n\r\n").unwrap_err();
        assert_eq!((e.status, e.head), (Status::NotFound, true));
        assert!(bytes(&e.response(), e.head).ends_with("\r\n\r\n"));
    }

    #[test]
    fn the_head_bound_is_431() {
        let head =
            |pad: usize| format!("GET /health HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\n\r\n", "p".repeat(pad));
        let base = head(0).len();
        assert_eq!(ok(&head(MAX_HEAD - base)).len, MAX_HEAD);
        assert_eq!(status(&head(MAX_HEAD - base + 1)), Status::HeaderFieldsTooLarge);
        // Without its end, a head is waited for up to the bound and refused at it.
        let open = head(MAX_HEAD);
        assert_eq!(req(&open[..MAX_HEAD - 1]), Ok(None));
        assert_eq!(status(&open[..MAX_HEAD]), Status::HeaderFieldsTooLarge);
        let e = req(&format!("HEAD /health HTTP/1.1\r\n{}", "X: y\r\n".repeat(2000))).unwrap_err();
        assert_eq!((e.status, e.head), (Status::HeaderFieldsTooLarge, true));
        // Too many header fields, however short.
        let many = |n: usize| format!("GET /health HTTP/1.1\r\nHost: h\r\n{}\r\n", "X: y\r\n".repeat(n));
        assert_eq!(ok(&many(MAX_HEADERS - 1)).route, Route::Health);
        assert_eq!(status(&many(MAX_HEADERS)), Status::HeaderFieldsTooLarge);
        // Other bounds can be asked for.
        let small = Limits { max_head: 32, max_body: 8 };
        assert_eq!(
            parse(get("/health").as_bytes(), &small).unwrap_err().status,
            Status::HeaderFieldsTooLarge
        );
    }

    #[test]
    fn the_body_bound_is_413_before_the_body_arrives() {
        let head = |len: usize| {
            format!("POST /unsubscribe/{TOK} HTTP/1.1\r\nHost: h\r\nContent-Type: {URLENCODED}\r\nContent-Length: {len}\r\n\r\n")
        };
        assert_eq!(status(&head(MAX_BODY + 1)), Status::PayloadTooLarge);
        assert_eq!(status(&head(usize::MAX)), Status::PayloadTooLarge);
        assert_eq!(
            status(&format!("{}99999999999999999999999999\r\n\r\n", &head(0)[..head(0).len() - 5])),
            Status::PayloadTooLarge
        );
        // At the bound: waited for, then taken.
        let body = format!("all=1&{}", "x".repeat(MAX_BODY - 6));
        let whole = format!("{}{body}", head(MAX_BODY));
        assert_eq!(req(&whole[..whole.len() - 1]), Ok(None));
        let r = ok(&whole);
        assert_eq!((r.action(), r.len), (Action::OptOut(&token()), whole.len()));
    }

    #[test]
    fn framing_errors() {
        let h = |extra: &str| format!("POST /unsubscribe/{TOK} HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
        assert_eq!(status(&h("Transfer-Encoding: chunked\r\n")), Status::LengthRequired);
        assert_eq!(status(&h("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n")), Status::LengthRequired);
        for cl in ["abc", "-1", "+1", "1 2", "0x10", "", "1,1"] {
            assert_eq!(status(&h(&format!("Content-Length: {cl}\r\n"))), Status::BadRequest, "{cl:?}");
        }
        assert_eq!(status(&h("Content-Length: 1\r\nContent-Length: 1\r\n")), Status::BadRequest);
        assert_eq!(status(&h("Content-Type: a/b\r\nContent-Type: a/b\r\n")), Status::BadRequest);
        assert_eq!(status(&h("Authorization: Bearer a\r\nAuthorization: Bearer b\r\n")), Status::BadRequest);
        assert_eq!(status(&h("Host: other\r\n")), Status::BadRequest);
        assert_eq!(status("GET /health HTTP/1.1\r\n\r\n"), Status::BadRequest);
        for bad in [
            "GET /health\r\n\r\n",
            "GET /health HTTP/2.0\r\nHost: h\r\n\r\n",
            "GET  /health HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /health HTTP/1.1\r\nHost h\r\n\r\n",
            "GET /health HTTP/1.1\r\n Host: h\r\n\r\n",
            "GET /health HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
            "GET /hea\x7fth HTTP/1.1\r\nHost: h\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03",
        ] {
            assert_eq!(status(bad), Status::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn a_body_is_waited_for() {
        let whole = post(&format!("/confirm/{TOK}"), URLENCODED, "confirm=1");
        for cut in 0..whole.len() {
            assert_eq!(req(&whole[..cut]), Ok(None), "{cut}");
        }
        assert_eq!(ok(&whole).action(), Action::Confirm(&token()));
        // A GET's body is waited for as well, so the client is not cut off mid-send.
        let get_body = "GET /health HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nx";
        assert_eq!(req(get_body), Ok(None));
        assert_eq!(ok(&format!("{get_body}y")).form, Form::default());
    }

    #[test]
    fn urlencoded_buttons() {
        let c = format!("/confirm/{TOK}");
        let u = format!("/unsubscribe/{TOK}");
        let t = token();
        let action = |path: &str, body: &str, want: Action<'_>| {
            assert_eq!(ok(&post(path, URLENCODED, body)).action(), want, "{body}");
        };
        action(&c, "confirm=1", Action::Confirm(&t));
        action(&c, "x=%zz&confirm=1&y", Action::Confirm(&t));
        action(&u, "unsubscribe=1", Action::Unsubscribe(&t));
        action(&u, "all=1", Action::OptOut(&t));
        action(&u, "unsubscribe=1&all=1", Action::OptOut(&t));
        action(&u, "List-Unsubscribe=One-Click", Action::Unsubscribe(&t));
        action(&u, "List%2dUnsubscribe=One%2DClick", Action::Unsubscribe(&t));
        let r =
            ok(&post(&u, "Application/X-WWW-Form-Urlencoded; charset=UTF-8", "List-Unsubscribe=One-Click"));
        assert_eq!(r.form, Form { one_click: true, ..Form::default() });
        // A POST without its page's button changes nothing.
        for (path, body) in [
            (&c, ""),
            (&c, "confirm=0"),
            (&c, "confirm=1x"),
            (&c, "confirm"),
            (&c, "Confirm=1"),
            (&c, "unsubscribe=1"),
            (&c, "all=1"),
            (&c, "List-Unsubscribe=One-Click"),
            (&c, "confirm=%31%"),
            (&u, "confirm=1"),
            (&u, "List-Unsubscribe=One-Click-Please"),
            (&u, "list-unsubscribe=one-click"),
            (&u, "all=on"),
        ] {
            let e = req(&post(path, URLENCODED, body)).unwrap_err();
            assert_eq!(e.status, Status::BadRequest, "{path} {body}");
            assert!(e.reason.contains("nothing was changed"), "{}", e.reason);
        }
        let bare = format!("POST {u} HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(status(&bare), Status::BadRequest);
    }

    fn multipart_body(boundary: &str, fields: &[(&str, &str)]) -> String {
        let mut b = String::from("preamble to ignore\r\n");
        for (name, value) in fields {
            b.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            ));
        }
        b.push_str(&format!("--{boundary}--\r\nepilogue"));
        b
    }

    #[test]
    fn multipart_buttons() {
        let u = format!("/unsubscribe/{TOK}");
        let boundary = "------------------------d74496d66958873e";
        let ct = format!("multipart/form-data; boundary={boundary}");
        // As curl -F sends RFC 8058's one-click body.
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--{boundary}--\r\n"
        );
        let r = ok(&post(&u, &ct, &body));
        assert_eq!((r.action(), r.form.one_click), (Action::Unsubscribe(&token()), true));
        let body = multipart_body(boundary, &[("x", "y"), ("all", "1")]);
        assert_eq!(ok(&post(&u, &ct, &body)).action(), Action::OptOut(&token()));
        let quoted = "Multipart/Form-Data; charset=utf-8; boundary=\"a b:c\"";
        let body = multipart_body("a b:c", &[("unsubscribe", "1")]);
        assert_eq!(ok(&post(&u, quoted, &body)).action(), Action::Unsubscribe(&token()));
        let body = multipart_body(boundary, &[("confirm", "1")]);
        let r = ok(&post(&format!("/confirm/{TOK}"), &ct, &body));
        assert_eq!(r.action(), Action::Confirm(&token()));
        // A part with other headers, a file name, and a value that is not ours.
        let body = format!(
            "--{boundary}\r\nContent-Type: text/plain\r\nContent-Disposition: form-data; filename=\"x\"; name=all\r\n\r\n1\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"unsubscribe\"\r\n\r\n1 \r\n--{boundary}--"
        );
        assert_eq!(ok(&post(&u, &ct, &body)).form, Form { all: true, ..Form::default() });
        // Without its button: 400, as urlencoded.
        let body = multipart_body(boundary, &[("unsubscribe", "0"), ("List-Unsubscribe", "one-click")]);
        assert_eq!(status(&post(&u, &ct, &body)), Status::BadRequest);
        let body = multipart_body(boundary, &[]);
        assert_eq!(status(&post(&u, &ct, &body)), Status::BadRequest);
        // Malformed.
        let one_click = multipart_body(boundary, &[("List-Unsubscribe", "One-Click")]);
        let malformed = [
            ("multipart/form-data".to_owned(), one_click.clone()),
            ("multipart/form-data; boundary=".to_owned(), one_click.clone()),
            (format!("multipart/form-data; boundary={}", "b".repeat(71)), one_click.clone()),
            (format!("multipart/form-data; boundary=x{boundary}"), one_click.clone()),
            (ct.clone(), one_click.replace("--\r\nepilogue", "")),
            (ct.clone(), one_click.replace("\"\r\n\r\n", "\"\r\n")),
            (ct.clone(), format!("--{boundary}junk\r\n\r\n\r\n--{boundary}--")),
        ];
        for (ct, body) in malformed {
            assert_eq!(status(&post(&u, &ct, &body)), Status::BadRequest, "{ct} {body:?}");
        }
    }

    #[test]
    fn a_body_that_is_no_form_is_415() {
        let u = format!("/unsubscribe/{TOK}");
        assert_eq!(
            status(&post(&u, "text/plain", "List-Unsubscribe=One-Click")),
            Status::UnsupportedMediaType
        );
        assert_eq!(status(&post(&u, "application/json", "{}")), Status::UnsupportedMediaType);
        let untyped = format!("POST {u} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nall=1");
        assert_eq!(status(&untyped), Status::UnsupportedMediaType);
    }

    #[test]
    fn proxy_headers_are_noted() {
        let with = |h: &str| ok(&format!("GET /metrics HTTP/1.1\r\nHost: h\r\n{h}\r\n\r\n")).proxied;
        assert!(!with("X-Other: 1"));
        assert!(with("Forwarded: for=192.0.2.60;proto=https"));
        assert!(with("forwarded: for=\"[2001:db8::1]\""));
        assert!(with("X-Forwarded-For: 127.0.0.1"));
        assert!(with("x-forwarded-for: "));
        assert!(with("X-Real-IP: 127.0.0.1"));
    }

    #[test]
    fn bearer_tokens() {
        let with = |h: &str| ok(&format!("GET /metrics HTTP/1.1\r\nHost: h\r\n{h}\r\n\r\n")).bearer;
        assert_eq!(with("Authorization: Bearer s3cret-T0ken"), Some(Token("s3cret-T0ken".into())));
        assert_eq!(with("authorization: bearer   s3cret \t"), Some(Token("s3cret".into())));
        assert_eq!(with("Authorization: Basic dXNlcjpwYXNz"), None);
        assert_eq!(with("Authorization: Bearer"), None);
        assert_eq!(with("Authorization: Bearer "), None);
        assert_eq!(with("Authorization: Bearer a b"), None);
        assert_eq!(with("Authorization: Bearerabc"), None);
        // Neither the bearer nor a link token ever shows in a logged request.
        let r = ok(&format!(
            "GET /confirm/{TOK} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer s3cret-T0ken\r\n\r\n"
        ));
        let logged = format!("{r:?} {:?} {:?}", r.action(), r.route);
        assert!(!logged.contains("s3cret") && !logged.contains(TOK), "{logged}");
        assert_eq!(r.route.name(), "confirm");
    }

    #[test]
    fn every_response_carries_the_safety_headers() {
        let responses = [
            confirm_page("a@b", &["e"]),
            confirm_page("a@b", &[]),
            confirmed_page("a@b", &["e", "f"]),
            confirmed_page("a@b", &[]),
            unsubscribe_page("a@b", "e"),
            unsubscribed_page("a@b", "e"),
            opted_out_page("a@b"),
            not_subscribed_page("a@b"),
            optout_page("a@b", &["e"]),
            optout_page("a@b", &[]),
            not_found_page(),
            error_page(Status::InternalServerError, "the database did not answer"),
            forbidden(),
            health(&[]),
            health(&["store"]),
            metrics_response(&[]),
        ];
        for r in &responses {
            for head in [false, true] {
                let out = bytes(r, head);
                let code = r.status.code();
                assert!(out.starts_with(&format!("HTTP/1.1 {code} {}\r\n", r.status.reason())), "{out}");
                for h in [
                    "Date: Sun, 06 Nov 1994 08:49:37 GMT",
                    "Connection: close",
                    "Cache-Control: no-store",
                    "Referrer-Policy: no-referrer",
                    "X-Frame-Options: DENY",
                    "X-Content-Type-Options: nosniff",
                    "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
                    &format!("Content-Length: {}", r.body.len()),
                ] {
                    assert_eq!(out.matches(&format!("\r\n{h}\r\n")).count(), 1, "{h} in {out}");
                }
                assert!(!out.contains("Location"), "{out}");
                let (_, body) = out.split_once("\r\n\r\n").unwrap();
                assert_eq!(body, if head { "" } else { &r.body });
            }
            if r.content_type == ContentType::Html {
                assert!(r.body.starts_with("<!DOCTYPE html>"));
                // No script, no external resource, no link anywhere.
                for banned in ["<script", "src=", "href=", "://", "<link", "@import", "url("] {
                    assert!(!r.body.contains(banned), "{banned} in {}", r.body);
                }
            }
        }
        assert!(bytes(&health(&[]), false).contains("\r\nContent-Type: text/plain; charset=utf-8\r\n"));
        let m = bytes(&metrics_response(&[]), false);
        assert!(m.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(bytes(&not_found_page(), false).contains("\r\nContent-Type: text/html; charset=utf-8\r\n"));
    }

    #[test]
    fn the_pages_say_what_they_do() {
        let p = confirm_page("ana@example.com", &["orders.shipped", "orders.paid"]).body;
        assert!(p.contains("<strong>ana@example.com</strong>"));
        assert!(p.contains("<li><code>orders.shipped</code></li>\n<li><code>orders.paid</code></li>"));
        assert!(p.contains("<form method=\"post\">"));
        assert!(p.contains("name=\"confirm\" value=\"1\">Confirm</button>"));
        let p = unsubscribe_page("ana@example.com", "orders.shipped").body;
        assert!(p.contains("name=\"unsubscribe\" value=\"1\">Unsubscribe</button>"));
        assert!(p.contains("name=\"all\" value=\"1\">Stop all email to this address</button>"));
        assert!(p.contains("<code>orders.shipped</code>"));
        let p = confirmed_page("ana@example.com", &["orders.shipped"]).body;
        assert!(p.contains("<p><strong>ana@example.com</strong> will receive"));
        assert!(unsubscribed_page("a@b", "e").body.contains("name=\"all\""));
        assert!(confirm_page("a@b", &[]).body.contains("Nothing to confirm"));
        assert_eq!(confirm_page("a@b", &[]), confirmed_page("a@b", &[]));
        assert_eq!(health(&[]).body, "ok");
        assert_eq!(
            health(&["store", "mailer 2"]),
            Response {
                status: Status::ServiceUnavailable,
                content_type: ContentType::Text,
                allow: None,
                body: "down: store, mailer 2".into(),
            }
        );
        let e = req(&post(&format!("/confirm/{TOK}"), URLENCODED, "")).unwrap_err();
        let p = e.response();
        assert_eq!(p.status, Status::BadRequest);
        assert!(p.body.contains("<title>Bad Request</title>") && p.body.contains("<p>Nothing was changed: "));
        assert_eq!(req(&get("/nope")).unwrap_err().response(), not_found_page());
    }

    #[test]
    fn inserted_values_are_escaped() {
        let mut s = String::new();
        escape_html(&mut s, "a&b<c>d\"e'f é");
        assert_eq!(s, "a&amp;b&lt;c&gt;d&quot;e&#39;f é");
        let evil = "<script>alert('x')</script>\"&";
        let escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;";
        for r in [
            confirm_page(evil, &[evil, "ok"]),
            confirmed_page(evil, &[evil]),
            unsubscribe_page(evil, evil),
            unsubscribed_page(evil, evil),
            opted_out_page(evil),
            not_subscribed_page(evil),
            optout_page(evil, &[evil]),
            error_page(Status::BadRequest, evil),
        ] {
            assert!(!r.body.contains("<script") && !r.body.contains("'x'"), "{}", r.body);
            assert!(r.body.contains(escaped), "{}", r.body);
        }
        let both = unsubscribe_page(evil, evil).body;
        assert_eq!(both.matches(escaped).count(), 2);
    }

    #[test]
    fn http_dates() {
        let date = |secs| {
            let mut out = Vec::new();
            imf_fixdate(secs, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(date(1_709_251_199), "Thu, 29 Feb 2024 23:59:59 GMT");
        assert_eq!(date(1_795_824_309), "Sat, 28 Nov 2026 00:05:09 GMT");
        assert_eq!(date(4_102_444_800), "Fri, 01 Jan 2100 00:00:00 GMT");
        assert_eq!(date(-5), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn metrics_parse_as_prometheus_text() {
        let metrics = [
            Metric {
                name: "uptime_seconds",
                help: "Seconds since start-up.",
                kind: MetricKind::Gauge,
                value: 42,
            },
            Metric {
                name: "connections",
                help: "Client connections now.",
                kind: MetricKind::Gauge,
                value: 0,
            },
            Metric {
                name: "emails_sent_total",
                help: "Emails handed to the relay.\nA back\\slash too.",
                kind: MetricKind::Counter,
                value: u64::from(u32::MAX) + 7,
            },
        ];
        let r = metrics_response(&metrics);
        assert_eq!(r.content_type, ContentType::Prometheus);
        assert!(r.body.starts_with(
            "# HELP notifd_uptime_seconds Seconds since start-up.\n# TYPE notifd_uptime_seconds gauge\nnotifd_uptime_seconds 42\n"
        ));
        assert!(r.body.contains(
            "# HELP notifd_emails_sent_total Emails handed to the relay.\\nA back\\\\slash too.\n"
        ));
        let lines = r.body.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        assert_eq!(scrape.samples.len(), 3);
        for (m, s) in metrics.iter().zip(&scrape.samples) {
            assert_eq!(s.metric, format!("notifd_{}", m.name));
            let want = match m.kind {
                MetricKind::Counter => prometheus_parse::Value::Counter(m.value as f64),
                MetricKind::Gauge => prometheus_parse::Value::Gauge(m.value as f64),
            };
            assert_eq!(s.value, want);
            assert!(scrape.docs.contains_key(&s.metric), "{:?}", scrape.docs);
        }
        assert_eq!(scrape.docs["notifd_uptime_seconds"], "Seconds since start-up.");
    }

    #[test]
    fn the_reader_gives_parse_answers_a_byte_at_a_time() {
        let requests = [
            get(&format!("/confirm/{TOK}")),
            post(&format!("/unsubscribe/{TOK}"), URLENCODED, "List-Unsubscribe=One-Click"),
            "\n\r\n\nGET /health HTTP/1.1\nHost: h\n\n".to_owned(),
            "GET /nope HTTP/1.1\r\nHost: h\r\n\r\n".to_owned(),
            "BAD\0 / HTTP/1.1\r\n\r\n".to_owned(),
        ];
        for r in requests {
            let mut reader = RequestReader::new();
            let limits = Limits::default();
            let mut got = Ok(None);
            for end in 1..=r.len() {
                got = reader.read(&r.as_bytes()[..end], &limits);
                if got != Ok(None) {
                    assert_eq!(end, r.len(), "{r:?}");
                }
            }
            assert_eq!(got, req(&r), "{r:?}");
            assert_ne!(got, Ok(None), "{r:?}");
        }
        // What is not HTTP is refused with its first bytes.
        let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        let e = RequestReader::new().read(hello, &Limits::default()).unwrap_err();
        assert_eq!(e.status, Status::BadRequest);
        // A head that never ends is refused at the bound.
        let mut reader = RequestReader::new();
        let endless = format!("GET /health HTTP/1.1\r\nX: {}", "y".repeat(MAX_HEAD));
        let limits = Limits::default();
        for end in 1..MAX_HEAD {
            assert_eq!(reader.read(&endless.as_bytes()[..end], &limits), Ok(None));
        }
        let e = reader.read(&endless.as_bytes()[..MAX_HEAD], &limits).unwrap_err();
        assert_eq!(e.status, Status::HeaderFieldsTooLarge);
    }

    /// A valid request of any route, method and form, with some other headers.
    fn valid_request() -> impl Strategy<Value = (String, Request)> {
        let route = prop_oneof![
            "[A-Za-z0-9_-]{22,60}".prop_map(|t| Route::Confirm(Token(t))),
            "[A-Za-z0-9_-]{22,60}".prop_map(|t| Route::Unsubscribe(Token(t))),
            Just(Route::Metrics),
            Just(Route::Health),
        ];
        let extra = proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,20}", "[ -~]{0,40}"), 0..6);
        (route, any::<bool>(), any::<bool>(), extra, any::<bool>(), any::<bool>()).prop_map(
            |(route, post, head, extra, proxied, multipart)| {
                let is_form = matches!(route, Route::Confirm(_) | Route::Unsubscribe(_));
                let method = match (post && is_form, head) {
                    (true, _) => Method::Post,
                    (false, true) => Method::Head,
                    (false, false) => Method::Get,
                };
                let path = match &route {
                    Route::Confirm(t) => format!("/confirm/{}", t.as_str()),
                    Route::Unsubscribe(t) => format!("/unsubscribe/{}", t.as_str()),
                    Route::Metrics => "/metrics".into(),
                    Route::Health => "/health".into(),
                };
                let (field, value, form) = match route {
                    Route::Confirm(_) => ("confirm", "1", Form { confirm: true, ..Form::default() }),
                    _ => ("List-Unsubscribe", "One-Click", Form { one_click: true, ..Form::default() }),
                };
                let mut s = format!(
                    "{} {path} HTTP/1.1\r\nHost: notifd.example\r\n",
                    match method {
                        Method::Get => "GET",
                        Method::Head => "HEAD",
                        Method::Post => "POST",
                    }
                );
                for (name, value) in extra {
                    let special =
                        ["host", "content-length", "content-type", "transfer-encoding", "authorization"];
                    let proxy = ["forwarded", "x-forwarded-for", "x-real-ip"];
                    let lower = name.to_ascii_lowercase();
                    if !special.contains(&lower.as_str()) && !proxy.contains(&lower.as_str()) {
                        s.push_str(&format!("{name}: {value}\r\n"));
                    }
                }
                if proxied {
                    s.push_str("X-Forwarded-For: 192.0.2.1\r\n");
                }
                let mut want_form = Form::default();
                if method == Method::Post {
                    want_form = form;
                    let (ct, body) = if multipart {
                        (
                            "multipart/form-data; boundary=XyZ".to_owned(),
                            multipart_body("XyZ", &[(field, value)]),
                        )
                    } else {
                        (URLENCODED.to_owned(), format!("{field}={value}"))
                    };
                    s.push_str(&format!(
                        "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    ));
                } else {
                    s.push_str("\r\n");
                }
                let len = s.len();
                (s, Request { method, route, form: want_form, proxied, bearer: None, len })
            },
        )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzz(&data);
            let _ = parse(&data, &Limits::default());
            let _ = RequestReader::new().read(&data, &Limits::default());
        }

        #[test]
        fn arbitrary_heads_never_panic(
            method in "GET|HEAD|POST|PUT|[A-Z]{1,8}",
            path in "/[ -~]{0,40}",
            headers in proptest::collection::vec(("[!-~]{1,20}", "[ -~]{0,40}"), 0..10),
            body in "[ -~]{0,200}",
            chunk in 1u8..40,
            host in any::<bool>(),
        ) {
            let mut s = format!("{method} {path} HTTP/1.1\r\n");
            if host {
                s.push_str("Host: h\r\n");
            }
            for (n, v) in headers {
                s.push_str(&format!("{n}: {v}\r\n"));
            }
            s.push_str(&format!("\r\n{body}"));
            let mut data = vec![chunk];
            data.extend_from_slice(s.as_bytes());
            fuzz(&data);
        }

        #[test]
        fn a_request_split_anywhere_parses_as_whole((s, want) in valid_request(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 1..4)) {
            let limits = Limits::default();
            prop_assert_eq!(parse(s.as_bytes(), &limits), Ok(Some(want.clone())));
            // Every prefix is "need more", never an answer of its own.
            for end in 0..s.len() {
                prop_assert_eq!(parse(&s.as_bytes()[..end], &limits), Ok(None), "cut at {}", end);
            }
            // Fed in pieces, the reader gets the same request at the last byte.
            let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(s.len())).collect();
            ends.push(s.len());
            ends.sort_unstable();
            let mut reader = RequestReader::new();
            for &end in &ends[..ends.len() - 1] {
                prop_assert_eq!(reader.read(&s.as_bytes()[..end], &limits), Ok(None));
            }
            prop_assert_eq!(reader.read(s.as_bytes(), &limits), Ok(Some(want)));
        }

        #[test]
        fn escaping_leaves_no_markup(s in "\\PC{0,60}") {
            let mut out = String::new();
            escape_html(&mut out, &s);
            prop_assert!(!out.contains(['<', '>', '"', '\'']));
            let back = out.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&");
            prop_assert_eq!(back, s);
        }
    }
}
