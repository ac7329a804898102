//! What the HTTP tests share: a response read whatever its status, and the HTTP side's
//! address from its log line. Included with `#[path]` by the test files that use it.

use std::collections::HashMap;
use std::net::SocketAddr;

/// What came back for a request: status, headers (names lowercased) and body.
pub struct Got {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// The response of a `ureq` call, an error status being a response like any other.
pub fn got(r: Result<ureq::Response, ureq::Error>) -> Got {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => panic!("HTTP request failed: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .map(|n| (n.to_ascii_lowercase(), resp.header(&n).unwrap().to_owned()))
        .collect();
    let body = resp.into_string().expect("a UTF-8 body");
    Got { status, headers, body }
}

/// The HTTP side's address, from its log line.
pub fn http_addr(d: &crate::util::Daemon) -> SocketAddr {
    let line = d.wait_log(|l| l.contains("http listening on "), crate::util::WAIT);
    line.rsplit("http listening on ").next().unwrap().trim().parse().expect("an address")
}
