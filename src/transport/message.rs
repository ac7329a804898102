//! The email for a job: a notification, or a confirmation. Pure: the same job and
//! settings give the same bytes (fixed Date, Message-ID and body), so a retry sends,
//! or spools, the same message.
//!
//! Both kinds carry `MIME-Version`, `Auto-Submitted: auto-generated` (RFC 3834) and a
//! text/plain body sent 7bit when it is ASCII; a notification also carries `List-Id`
//! and, with `public_url`, `List-Unsubscribe` (and RFC 8058's `List-Unsubscribe-Post`
//! for an https link). The lines a reader sends back (`UNSUB`, `CONFIRM`, `OPTOUT`) are
//! alone on their lines, exactly as the server takes them.

use super::{fnv1a, parse_from, MailError};
use crate::ipc::{AskedPair, MailJob, MailKind, MailSettings, CONFIRMATION_IDS};
use lettre::address::Address;
use lettre::message::header::{
    ContentTransferEncoding, ContentType, HeaderName, HeaderValue, MIME_VERSION_1_0,
};
use lettre::message::{Body, Mailbox};
use lettre::Message;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Width of the prose in a body, well under the 76 at which lettre would give up 7bit.
const WIDTH: usize = 72;

/// Longest line RFC 5322 allows in a body, without its CRLF.
const MAX_LINE: usize = 998;

/// Events a confirmation email names one by one; more are counted.
const LISTED_EVENTS: usize = 50;

/// What every message from one mailer shares: the sender, where links point, and the
/// server the reader sends commands to.
pub(crate) struct Writer {
    pub(crate) from: Mailbox,
    /// `public_url` without a trailing slash; empty for no links.
    public_url: String,
    /// `host:port` of the notifd server.
    server: String,
}

impl Writer {
    /// From the mailer's settings.
    pub(crate) fn new(settings: &MailSettings) -> Result<Writer, MailError> {
        Ok(Writer {
            from: parse_from(&settings.from)?,
            public_url: settings.public_url.trim_end_matches('/').to_string(),
            server: settings.server.clone(),
        })
    }

    /// The email for `job`.
    pub(crate) fn compose(&self, job: &MailJob) -> Result<Message, MailError> {
        let address: Address = job.email.parse().map_err(|e: lettre::address::AddressError| {
            MailError::Recipient(format!("{:?}: {e}", job.email))
        })?;
        if !job.email.is_ascii() {
            return Err(MailError::Recipient(format!("{:?} is not ASCII", job.email)));
        }
        let at = UNIX_EPOCH + Duration::from_secs(job.created_at.max(0) as u64);
        let builder = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, address))
            .date(at)
            .message_id(Some(message_id(job)))
            .header(MIME_VERSION_1_0)
            .raw_header(header("Auto-Submitted", "auto-generated".into()))
            .header(ContentType::TEXT_PLAIN);
        let (builder, text) = match &job.kind {
            MailKind::Notification { unsub_code, unsub_token } => {
                let mut builder = builder
                    .subject(format!("[notifd] {}", header_text(&job.event)))
                    .raw_header(header("List-Id", list_id(&job.event, &self.from)));
                let link = self.link("unsubscribe", unsub_token);
                if let Some(url) = &link {
                    builder = builder.raw_header(header("List-Unsubscribe", format!("<{url}>")));
                    if url.starts_with("https://") {
                        builder = builder
                            .raw_header(header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click".into()));
                    }
                }
                (builder, self.notification_text(job, at, unsub_code, link.as_deref()))
            }
            MailKind::Confirmation { events, confirm_code, optout_code, confirm_token, optout_token } => {
                let subject = match events.len() {
                    1 => format!("[notifd] Confirm notifications of {}", header_text(&events[0].event)),
                    n => format!("[notifd] Confirm notifications of {n} events"),
                };
                let text = self.confirmation_text(
                    job,
                    events,
                    (confirm_code, self.link("confirm", confirm_token)),
                    (optout_code, self.link("unsubscribe", optout_token)),
                );
                (builder.subject(subject), text)
            }
        };
        builder.body(body(text)).map_err(|e| MailError::Message(e.to_string()))
    }

    fn link(&self, path: &str, token: &str) -> Option<String> {
        (!self.public_url.is_empty()).then(|| format!("{}/{path}/{token}", self.public_url))
    }

    fn notification_text(
        &self,
        job: &MailJob,
        published: SystemTime,
        code: &str,
        link: Option<&str>,
    ) -> String {
        let mut out = clean_text(&job.text);
        out.push_str(&format!(
            "\n\nEvent: {event}\nNotification: {id}\nPublished: {time}\n\n",
            event = job.event,
            id = job.id,
            time = humantime::format_rfc3339_seconds(published),
        ));
        // Fixed line breaks rather than filled prose: a reader's tools (and the tests)
        // find the address, the event and the server on lines of their own.
        out.push_str(&format!("You receive this because {}\nis subscribed to {}.\n", job.email, job.event));
        if let Some(url) = link {
            out.push_str(&format!(
                "To stop it, open this link (it asks before it changes anything):\n{url}\nor send"
            ));
        } else {
            out.push_str("To stop it, send");
        }
        out.push_str(&format!(" this line to the notifd server at\n{}:\n", self.server));
        out.push_str(&format!("\nUNSUB {} {} {code}\n", job.event, job.email));
        out
    }

    fn confirmation_text(
        &self,
        job: &MailJob,
        events: &[AskedPair],
        (confirm_code, confirm_link): (&str, Option<String>),
        (optout_code, optout_link): (&str, Option<String>),
    ) -> String {
        let mut out = String::new();
        prose(
            &mut out,
            &format!(
                "Someone asked the notifd server at {} to email {} when these events happen:",
                self.server, job.email
            ),
        );
        out.push('\n');
        for e in events.iter().take(LISTED_EVENTS) {
            let at =
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(e.asked_at.max(0) as u64));
            let who = if e.asked_by.is_empty() { "an unknown address" } else { e.asked_by.as_str() };
            out.push_str(&format!("  {}\n    asked from {who} at {at}\n", e.event));
        }
        if events.len() > LISTED_EVENTS {
            out.push_str(&format!("  and {} more\n", events.len() - LISTED_EVENTS));
        }
        out.push('\n');
        prose(
            &mut out,
            "Nothing is sent to you unless you confirm. If you did not ask for this, ignore this email: \
             that is enough.",
        );
        out.push('\n');
        match &confirm_link {
            Some(url) => {
                prose(&mut out, "To confirm, open this link and press Confirm:");
                out.push_str(url);
                out.push('\n');
                prose(&mut out, &format!("or send this line to the notifd server at {}:", self.server));
            }
            None => prose(
                &mut out,
                &format!("To confirm, send this line to the notifd server at {}:", self.server),
            ),
        }
        out.push_str(&format!("\nCONFIRM {} {confirm_code}\n\n", job.email));
        match &optout_link {
            Some(url) => {
                prose(&mut out, "To never get email from this server again, open this link:");
                out.push_str(url);
                out.push('\n');
                prose(&mut out, "or send this line to the server:");
            }
            None => {
                prose(&mut out, "To never get email from this server again, send this line to the server:")
            }
        }
        out.push_str(&format!("\nOPTOUT {} {optout_code}\n", job.email));
        out
    }
}

/// A header line from a value the caller made safe (no CR or LF can be in it: the
/// events and addresses are checked by the protocol, the URL by the configuration, and
/// `header_text` is applied anyway). lettre folds it at spaces and encodes no ASCII.
fn header(name: &'static str, value: String) -> HeaderValue {
    HeaderValue::new(HeaderName::new_from_ascii_str(name), header_text(&value))
}

/// `"EVENT" <LABEL.notifd.DOMAIN>` (RFC 2919): the label is the event with what a
/// dot-atom cannot hold (`:`, `_` runs of dots) made `-`, the domain `mail_from`'s.
fn list_id(event: &str, from: &Mailbox) -> String {
    let mut label = String::with_capacity(event.len());
    for c in event.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' };
        if c == '.' && (label.is_empty() || label.ends_with('.')) {
            continue;
        }
        label.push(c);
    }
    let label = label.trim_end_matches('.');
    let label = if label.is_empty() { "event" } else { label };
    format!("\"{}\" <{label}.notifd.{}>", event, from.email.domain())
}

/// The message body: 7bit when it is ASCII with no line over RFC 5322's 998 bytes
/// (the links and the reply lines may be longer than lettre's own limit for 7bit, 76,
/// and quoted-printable would break them with `=`); else lettre's choice.
fn body(text: String) -> Body {
    // Every line end CRLF, and no bare CR or LF (an event or address with one would be
    // refused by the protocol; this is the last line of defence).
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    if text.is_ascii() && text.lines().all(|l| l.len() <= MAX_LINE) {
        Body::dangerous_pre_encoded(
            text.replace('\n', "\r\n").into_bytes(),
            ContentTransferEncoding::SevenBit,
        )
    } else {
        Body::new(text)
    }
}

/// `text` filled into lines of at most [`WIDTH`] (a longer word stays whole), then a
/// line end.
fn prose(out: &mut String, text: &str) {
    let mut line = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if line > 0 && line + 1 + word.len() > WIDTH {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out.push('\n');
}

/// `<ID.HASH@notifd>` for a notification, `<confirm.N.HASH@notifd>` for a confirmation:
/// the same for every try of a job, different for each address.
pub(crate) fn message_id(job: &MailJob) -> String {
    let hash = fnv1a(job.email.as_bytes());
    if job.id & CONFIRMATION_IDS != 0 {
        format!("<confirm.{}.{hash:016x}@notifd>", job.id & !CONFIRMATION_IDS)
    } else {
        format!("<{}.{hash:016x}@notifd>", job.id)
    }
}

/// A value for a header: the protocol already keeps control characters out of events,
/// but no CR or LF may ever reach a header line.
fn header_text(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// The client's text: line breaks become plain LF (made CRLF on the wire), and other
/// control characters but tab become spaces, so no bare CR reaches a relay.
fn clean_text(raw: &str) -> String {
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                text.push('\n');
            }
            '\n' | '\t' => text.push(c),
            c if c.is_control() => text.push(' '),
            c => text.push(c),
        }
    }
    text
}
