//! Codes and link tokens for consent: the proofs that the owner of an address asked
//! for something. Pure: no I/O, no logging.
//!
//! Everything here is an HMAC-SHA256, keyed with the server's [`Secret`], of what it
//! stands for, so nothing has to be stored to check it and nothing can be forged
//! without the secret:
//!
//! - the CONFIRM code: an address and the sequence number of the last pair its
//!   confirmation email listed;
//! - the OPTOUT code: an address;
//! - the UNSUB code: an address and an event;
//! - link tokens: the same things, carried in a URL with 128 bits of the MAC.
//!
//! Codes are 12 characters of Crockford base32 (60 bits), printed in groups of four
//! (`7KQ2-M4XH-9TZB`); case and dashes are ignored on input. Comparisons run in
//! constant time. [`mailbox`] is the normal form of an address for the limits on
//! confirmation emails.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use subtle::ConstantTimeEq;

/// Bytes of the server secret.
pub const SECRET_LEN: usize = 32;

/// Characters of a code, without its dashes.
pub const CODE_LEN: usize = 12;

/// Bytes of the MAC carried in a link token: 128 bits.
const TOKEN_MAC_LEN: usize = 16;

/// The longest token [`Secret::open`] looks at: an address of 254 bytes, an event of
/// 128 and the MAC, in base64. Longer input is refused before any decoding.
pub const MAX_TOKEN: usize = 600;

/// Crockford's base32 alphabet: no I, L, O or U.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The server secret, made once when the database is created and kept in it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; SECRET_LEN]);

impl fmt::Debug for Secret {
    /// Never the bytes: a secret must not reach a log by way of `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A CONFIRM, OPTOUT or UNSUB code: 12 Crockford base32 characters, upper case.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Code([u8; CODE_LEN]);

impl fmt::Display for Code {
    /// In groups of four: `7KQ2-M4XH-9TZB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, group) in self.0.chunks(4).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            // The alphabet is ASCII.
            f.write_str(std::str::from_utf8(group).unwrap_or("????"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code({self})")
    }
}

impl Code {
    /// A code as a person typed it: case and dashes do not matter, and Crockford's
    /// look-alikes are read as he says (I and L as 1, O as 0). `None` unless exactly
    /// 12 symbols remain.
    pub fn parse(text: &str) -> Option<Code> {
        let mut out = [0u8; CODE_LEN];
        let mut n = 0;
        for b in text.bytes() {
            let c = match b.to_ascii_uppercase() {
                b'-' => continue,
                b'I' | b'L' => b'1',
                b'O' => b'0',
                c if CROCKFORD.contains(&c) => c,
                _ => return None,
            };
            *out.get_mut(n)? = c;
            n += 1;
        }
        (n == CODE_LEN).then_some(Code(out))
    }

    /// Whether two codes are the same, in time that does not depend on where they differ.
    pub fn matches(&self, other: &Code) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// What a link token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Confirm the pending pairs of `email` up to sequence number `seq`.
    Confirm {
        /// The address.
        email: String,
        /// The sequence number of the last pair the confirmation email listed.
        seq: u64,
    },
    /// Unsubscribe `email` from `event` (the page also offers to opt out of everything).
    Unsubscribe {
        /// The address.
        email: String,
        /// The event.
        event: String,
    },
    /// Opt `email` out of everything (the stop-all link of a confirmation email).
    OptOut {
        /// The address.
        email: String,
    },
}

/// Domain separation: one MAC input per kind of proof, so that no code or token of one
/// kind is ever valid as another.
const CONFIRM_CODE: &[u8] = b"notifd confirm code";
const OPTOUT_CODE: &[u8] = b"notifd optout code";
const UNSUB_CODE: &[u8] = b"notifd unsub code";
const LINK: &[u8] = b"notifd link";

/// The first byte of a token's payload: which [`Link`] it is.
const TAG_CONFIRM: u8 = b'c';
const TAG_UNSUBSCRIBE: u8 = b'u';
const TAG_OPTOUT: u8 = b'o';

impl Secret {
    /// A new secret from the operating system's random source.
    pub fn generate() -> Result<Secret, getrandom::Error> {
        let mut bytes = [0u8; SECRET_LEN];
        getrandom::getrandom(&mut bytes)?;
        Ok(Secret(bytes))
    }

    /// The secret kept in the database; `None` when it is not [`SECRET_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Secret> {
        Some(Secret(bytes.try_into().ok()?))
    }

    /// The bytes to keep in the database.
    pub fn as_bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// HMAC-SHA256 of `purpose` and `parts`, each part length-prefixed so that no two
    /// different lists of parts give the same input.
    fn mac(&self, purpose: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(purpose);
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    fn code(&self, purpose: &[u8], parts: &[&[u8]]) -> Code {
        let tag = self.mac(purpose, parts).finalize().into_bytes();
        let bits = u64::from_be_bytes(tag[..8].try_into().expect("8 of 32 bytes"));
        let mut out = [0u8; CODE_LEN];
        for (i, c) in out.iter_mut().enumerate() {
            *c = CROCKFORD[((bits >> (59 - 5 * i)) & 31) as usize];
        }
        Code(out)
    }

    /// The CONFIRM code of the confirmation email to `email` whose last listed pair has
    /// sequence number `seq`.
    pub fn confirm_code(&self, email: &str, seq: u64) -> Code {
        self.code(CONFIRM_CODE, &[email.as_bytes(), &seq.to_be_bytes()])
    }

    /// The OPTOUT code of `email`.
    pub fn optout_code(&self, email: &str) -> Code {
        self.code(OPTOUT_CODE, &[email.as_bytes()])
    }

    /// The UNSUB code of the pair (`email`, `event`).
    pub fn unsub_code(&self, email: &str, event: &str) -> Code {
        self.code(UNSUB_CODE, &[email.as_bytes(), event.as_bytes()])
    }

    /// The URL-safe token for `link`: base64url of its payload and 128 bits of its MAC.
    pub fn token(&self, link: &Link) -> String {
        let mut bytes = payload(link);
        let tag = self.mac(LINK, &[&bytes]).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..TOKEN_MAC_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// What `token` stands for, if this secret made it.
    pub fn open(&self, token: &str) -> Option<Link> {
        if !token_form_ok(token) {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let (body, tag) = bytes.split_at(bytes.len().checked_sub(TOKEN_MAC_LEN)?);
        // verify_truncated_left compares in constant time.
        self.mac(LINK, &[body]).verify_truncated_left(tag).ok()?;
        parse_payload(body)
    }
}

fn payload(link: &Link) -> Vec<u8> {
    let mut out = Vec::with_capacity(300);
    match link {
        Link::Confirm { email, seq } => {
            out.push(TAG_CONFIRM);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(email.as_bytes());
        }
        Link::Unsubscribe { email, event } => {
            out.push(TAG_UNSUBSCRIBE);
            out.extend_from_slice(email.as_bytes());
            // Neither an address nor an event holds a NUL.
            out.push(0);
            out.extend_from_slice(event.as_bytes());
        }
        Link::OptOut { email } => {
            out.push(TAG_OPTOUT);
            out.extend_from_slice(email.as_bytes());
        }
    }
    out
}

fn parse_payload(body: &[u8]) -> Option<Link> {
    let (&tag, rest) = body.split_first()?;
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok().filter(|s| !s.is_empty());
    match tag {
        TAG_CONFIRM => {
            let seq = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
            Some(Link::Confirm { email: text(&rest[8..])?, seq })
        }
        TAG_UNSUBSCRIBE => {
            let at = rest.iter().position(|&b| b == 0)?;
            Some(Link::Unsubscribe { email: text(&rest[..at])?, event: text(&rest[at + 1..])? })
        }
        TAG_OPTOUT => Some(Link::OptOut { email: text(rest)? }),
        _ => None,
    }
}

/// Whether `token` has the form of a token (length and alphabet), without the secret:
/// what the reactor can check before it asks the store.
pub fn token_form_ok(token: &str) -> bool {
    // The shortest: a tag, one byte of address and the MAC.
    let min = (1 + 1 + TOKEN_MAC_LEN) * 4 / 3;
    (min..=MAX_TOKEN).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The mailbox an address reaches, for the limits on confirmation emails: the local
/// part lowercased and cut at the first `+`, the domain lowercased. So `Ana+x@Example.com`
/// and `ana@example.com` share one limit.
pub fn mailbox(email: &str) -> String {
    let (local, domain) = email.rsplit_once('@').unwrap_or((email, ""));
    let local = local.split('+').next().unwrap_or(local);
    format!("{}@{}", local.to_ascii_lowercase(), domain.to_ascii_lowercase())
}

/// The domain of an address, lowercased, for the per-domain limit.
pub fn domain(email: &str) -> String {
    email.rsplit_once('@').map_or("", |(_, d)| d).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret(b: u8) -> Secret {
        Secret([b; SECRET_LEN])
    }

    #[test]
    fn codes_have_their_printed_form() {
        let code = secret(1).confirm_code("ana@example.com", 7);
        let text = code.to_string();
        assert_eq!(text.len(), 14);
        let groups: Vec<&str> = text.split('-').collect();
        assert_eq!(groups.len(), 3);
        assert!(groups.iter().all(|g| g.len() == 4 && g.bytes().all(|b| CROCKFORD.contains(&b))));
        // Stable across builds, so a code in an email sent before an upgrade still works:
        // the value computed apart, with Python's hmac module.
        assert_eq!(text, "CJ9S-2S25-8YVT");
    }

    #[test]
    fn codes_read_as_typed() {
        let code = secret(2).optout_code("bo@example.net");
        let text = code.to_string();
        assert_eq!(Code::parse(&text), Some(code));
        assert_eq!(Code::parse(&text.to_lowercase()), Some(code));
        assert_eq!(Code::parse(&text.replace('-', "")), Some(code));
        assert_eq!(Code::parse("7KQ2-M4XH-9TZB").unwrap().to_string(), "7KQ2-M4XH-9TZB");
        // Crockford's look-alikes.
        assert_eq!(Code::parse("ilo0-0000-0000").unwrap().to_string(), "1100-0000-0000");
        for bad in
            ["", "7KQ2-M4XH-9TZ", "7KQ2-M4XH-9TZBB", "7KQ2-M4XH-9TZU", "7KQ2 M4XH 9TZB", "7KQ2-M4XH-9TZ*"]
        {
            assert_eq!(Code::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn kinds_never_stand_for_each_other() {
        let s = secret(3);
        let a = s.confirm_code("a@b", 1);
        assert!(!a.matches(&s.confirm_code("a@b", 2)));
        assert!(!a.matches(&s.confirm_code("A@b", 1)));
        assert!(!a.matches(&secret(4).confirm_code("a@b", 1)));
        assert!(!s.optout_code("a@b").matches(&s.unsub_code("a@b", "")));
        // Length prefixes: moving a byte between parts changes the code.
        assert!(!s.unsub_code("a@bc", "d").matches(&s.unsub_code("a@b", "cd")));
        let confirm = s.token(&Link::Confirm { email: "a@b".into(), seq: 1 });
        assert!(matches!(s.open(&confirm), Some(Link::Confirm { .. })));
        assert_eq!(secret(4).open(&confirm), None);
    }

    #[test]
    fn tokens_round_trip_and_are_url_safe() {
        let s = secret(5);
        let long_email = format!("{}@{}", "x".repeat(64), "d".repeat(189));
        for link in [
            Link::Confirm { email: "ana@example.com".into(), seq: u64::MAX },
            Link::Unsubscribe { email: long_email.clone(), event: "e".repeat(128) },
            Link::OptOut { email: "a@b".into() },
        ] {
            let t = s.token(&link);
            assert!(token_form_ok(&t), "{t}");
            // At least 128 bits of MAC, plus what it stands for.
            assert!(t.len() * 6 >= 128 + 8 * 3, "{t}");
            assert_eq!(s.open(&t), Some(link));
        }
        for bad in ["", "abc", "a b", &"A".repeat(MAX_TOKEN + 1)] {
            assert_eq!(s.open(bad), None);
        }
    }

    #[test]
    fn mailboxes() {
        assert_eq!(mailbox("Ana+news@Example.COM"), "ana@example.com");
        assert_eq!(mailbox("ana@example.com"), "ana@example.com");
        assert_eq!(mailbox("+x@y"), "@y");
        assert_eq!(mailbox("a+b+c@y"), "a@y");
        assert_eq!(domain("Ana@Example.COM"), "example.com");
    }

    #[test]
    fn generated_secrets_differ_and_load_back() {
        let a = Secret::generate().unwrap();
        let b = Secret::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(Secret::from_bytes(a.as_bytes()), Some(a.clone()));
        assert_eq!(Secret::from_bytes(&[0; 31]), None);
        assert_eq!(format!("{a:?}"), "Secret(..)");
    }

    proptest! {
        #[test]
        fn a_changed_character_fails(email in "[a-z0-9.+]{1,20}@[a-z]{1,10}", seq in any::<u64>(),
                                     at in 0usize..CODE_LEN, to in 0usize..32) {
            let s = secret(9);
            let code = s.confirm_code(&email, seq);
            let mut bytes = code.0;
            prop_assume!(bytes[at] != CROCKFORD[to]);
            bytes[at] = CROCKFORD[to];
            let typed = String::from_utf8(bytes.to_vec()).unwrap();
            prop_assert!(!Code::parse(&typed).unwrap().matches(&code));
            prop_assert!(Code::parse(&code.to_string().to_lowercase()).unwrap().matches(&code));
        }

        #[test]
        fn a_changed_token_fails(email in "[a-z0-9.+]{1,20}@[a-z]{1,10}", event in "[a-z.:_-]{1,30}",
                                 at in any::<prop::sample::Index>(), to in 0u8..64) {
            let s = secret(10);
            let link = Link::Unsubscribe { email, event };
            let t = s.token(&link);
            prop_assert_eq!(s.open(&t), Some(link));
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut bytes = t.clone().into_bytes();
            let i = at.index(bytes.len());
            prop_assume!(bytes[i] != alphabet[to as usize]);
            bytes[i] = alphabet[to as usize];
            let forged = String::from_utf8(bytes).unwrap();
            // The last character may carry only padding bits, which the decoder refuses.
            prop_assert_eq!(s.open(&forged), None);
        }

        #[test]
        fn garbage_never_opens(t in "[A-Za-z0-9_-]{0,700}") {
            prop_assert_eq!(secret(11).open(&t), None);
        }
    }
}
