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
    /// 500: the store failed to answer a page's question.
    InternalServerError,
    /// 503: `/health` when the store or a mailer does not answer, or the server is full.
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
            _ => form.unsubscribe || form.one_click || form.all,
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
/// time. Its answers are [`parse`]'s, but a malformed head may be answered only once its
/// blank line (or the head bound) arrives.
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
                self.scanned = window.len();
                if !ended && window.len() < limits.max_head {
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

fn event_list(b: &mut String, events: &[&str]) {
    b.push_str("<ul>\n");
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
        b.push_str("<p>Someone asked that ");
        address(b, addr);
        b.push_str(" receive an email each time one of these events happens:</p>\n");
        event_list(b, events);
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
        b.push_str("<p>");
        address(b, addr);
        b.push_str(" will receive an email each time one of these events happens:</p>\n");
        event_list(b, events);
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

/// A page for any other refusal or failure: the status and one sentence.
pub fn error_page(status: Status, text: &str) -> Response {
    page(status, status.reason(), |b| {
        b.push_str("<p>");
        escape_html(b, text);
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
