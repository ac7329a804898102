//! A connection's live subscriptions: (event, email) pairs; and, across connections,
//! the live addresses of each event.
//!
//! Most connections hold one or a few pairs, and an idle connection should cost little,
//! so a short list is a plain vector. A connection may hold up to `max_subs_per_conn`
//! pairs, though, and a linear search per SUB would make subscribing quadratic; past
//! [`FEW`] pairs the set switches to hashing.

use indexmap::{Equivalent, IndexSet};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

/// Up to this many pairs, a linear search is cheaper than hashing.
const FEW: usize = 16;

type Pair = (Rc<str>, Box<str>);

/// The hashed form: the pairs, and how many pairs each event has.
type Hashed = (IndexSet<Pair>, HashMap<Rc<str>, u32>);

/// Looks a pair up by borrowed strings; hashes exactly as the owned tuple does.
struct PairRef<'a>(&'a str, &'a str);

impl Hash for PairRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h);
        self.1.hash(h);
    }
}

impl Equivalent<Pair> for PairRef<'_> {
    fn equivalent(&self, key: &Pair) -> bool {
        *key.0 == *self.0 && *key.1 == *self.1
    }
}

/// The pairs of one connection.
#[derive(Default)]
pub enum Subs {
    /// No pair: no allocation.
    #[default]
    Empty,
    /// Up to [`FEW`] pairs: a vector.
    Few(Vec<Pair>),
    /// Many pairs, hashed.
    Many(Box<Hashed>),
}

impl Subs {
    /// How many pairs.
    pub fn len(&self) -> usize {
        match self {
            Subs::Empty => 0,
            Subs::Few(v) => v.len(),
            Subs::Many(m) => m.0.len(),
        }
    }

    /// The pair is there.
    pub fn contains(&self, event: &str, email: &str) -> bool {
        match self {
            Subs::Empty => false,
            Subs::Few(v) => v.iter().any(|(e, m)| &**e == event && &**m == email),
            Subs::Many(m) => m.0.contains(&PairRef(event, email)),
        }
    }

    /// Some pair is on `event`.
    pub fn has_event(&self, event: &str) -> bool {
        match self {
            Subs::Empty => false,
            Subs::Few(v) => v.iter().any(|(e, _)| &**e == event),
            Subs::Many(m) => m.1.contains_key(event),
        }
    }

    /// Adds a pair the caller checked is absent.
    pub fn insert(&mut self, event: Rc<str>, email: Box<str>) {
        match self {
            Subs::Empty => *self = Subs::Few(vec![(event, email)]),
            Subs::Few(v) if v.len() < FEW => v.push((event, email)),
            Subs::Few(v) => {
                let mut set = IndexSet::with_capacity(v.len() * 2);
                let mut counts: HashMap<Rc<str>, u32> = HashMap::new();
                for (e, m) in v.drain(..).chain(std::iter::once((event, email))) {
                    *counts.entry(Rc::clone(&e)).or_default() += 1;
                    set.insert((e, m));
                }
                *self = Subs::Many(Box::new((set, counts)));
            }
            Subs::Many(m) => {
                if m.0.len() == m.0.capacity() {
                    // Doubling, exactly: left to itself the set reserves entries up to its
                    // hash table's capacity, about 1.8 times the pairs.
                    m.0.reserve_exact(m.0.len());
                }
                *m.1.entry(Rc::clone(&event)).or_default() += 1;
                m.0.insert((event, email));
            }
        }
    }

    /// Removes a pair; true if it was there.
    pub fn remove(&mut self, event: &str, email: &str) -> bool {
        match self {
            Subs::Empty => false,
            Subs::Few(v) => match v.iter().position(|(e, m)| &**e == event && &**m == email) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.is_empty() {
                        *self = Subs::Empty;
                    }
                    true
                }
                None => false,
            },
            Subs::Many(m) => {
                if m.0.swap_remove(&PairRef(event, email)) {
                    if let Some(n) = m.1.get_mut(event) {
                        *n -= 1;
                        if *n == 0 {
                            m.1.remove(event);
                        }
                    }
                    if m.0.len() * 4 <= m.0.capacity() && m.0.capacity() > 4 * FEW {
                        // Mostly emptied: give the memory back. Only after three quarters
                        // went, so the cost per remove stays constant.
                        m.0.shrink_to_fit();
                        m.1.shrink_to_fit();
                    }
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Every pair.
    pub fn iter(&self) -> impl Iterator<Item = &Pair> {
        let (few, many) = match self {
            Subs::Empty => (&[][..], None),
            Subs::Few(v) => (&v[..], None),
            Subs::Many(m) => (&[][..], Some(m.0.iter())),
        };
        few.iter().chain(many.into_iter().flatten())
    }
}

/// Per event, the addresses that connections hold live, each with how many trusted and
/// untrusted connections hold it: what `mail_policy = "offline"` leaves out of a
/// publication's emails. Only a *trusted* holder makes an address live, so that a
/// stranger cannot silence someone's email by subscribing their address. A PUB reads
/// its own event's entry, so its cost follows that event's live addresses, not every
/// pair of every connection subscribed to it.
///
/// It holds exactly the pairs in the connections' [`Subs`], each counted under the trust
/// its connection had when the pair was counted (`Conn::live_trusted`); a connection
/// whose trust changes (AUTH) moves its pairs from one count to the other, and a reload
/// that changes the token has the index built afresh. A closing connection's pairs are
/// taken out before the next PUB reads it (see `Clients::live_addresses`). The reactor
/// keeps it only while the policy is offline: it costs a copy of each live address,
/// which the other policies have no use for.
#[derive(Default)]
pub struct LiveAddrs {
    events: HashMap<Rc<str>, HashMap<Box<str>, Holders>>,
}

/// The connections that hold one (event, address) pair live.
#[derive(Default)]
struct Holders {
    /// Trusted ones: the address is live while there is one.
    trusted: u32,
    /// Untrusted ones, which make nothing live but are kept so that a connection can
    /// move its pairs when it AUTHs.
    untrusted: u32,
}

impl Holders {
    fn count(&mut self, trusted: bool) -> &mut u32 {
        if trusted {
            &mut self.trusted
        } else {
            &mut self.untrusted
        }
    }
}

impl LiveAddrs {
    /// The index of these connections' pairs, each with its connection's trust.
    pub fn of<'a>(conns: impl Iterator<Item = (&'a Subs, bool)>) -> LiveAddrs {
        let mut live = LiveAddrs::default();
        for (subs, trusted) in conns {
            live.add_all(subs, trusted);
        }
        live
    }

    /// One more connection holds the pair. A WATCH (kept as the pair with an empty
    /// address, see `replay::WATCH`) has no address to leave out of the email.
    pub fn add(&mut self, event: &Rc<str>, email: &str, trusted: bool) {
        if email.is_empty() {
            return;
        }
        let addrs = self.events.entry(Rc::clone(event)).or_default();
        if let Some(h) = addrs.get_mut(email) {
            *h.count(trusted) += 1;
        } else {
            let mut h = Holders::default();
            *h.count(trusted) = 1;
            addrs.insert(email.into(), h);
        }
    }

    /// One connection fewer holds the pair.
    pub fn remove(&mut self, event: &str, email: &str, trusted: bool) {
        if email.is_empty() {
            return;
        }
        let Some(addrs) = self.events.get_mut(event) else { return };
        let Some(h) = addrs.get_mut(email) else { return };
        let n = h.count(trusted);
        *n = n.saturating_sub(1);
        if h.trusted == 0 && h.untrusted == 0 {
            addrs.remove(email);
            if addrs.is_empty() {
                self.events.remove(event);
            }
        }
    }

    /// A connection's pairs, all at once.
    pub fn add_all(&mut self, subs: &Subs, trusted: bool) {
        for (e, m) in subs.iter() {
            self.add(e, m, trusted);
        }
    }

    /// A connection's pairs leave.
    pub fn remove_all(&mut self, subs: &Subs, trusted: bool) {
        for (e, m) in subs.iter() {
            self.remove(e, m, trusted);
        }
    }

    /// The addresses a trusted connection holds live on `event`, each once, in no
    /// particular order.
    pub fn addresses(&self, event: &str) -> impl Iterator<Item = &str> {
        self.events
            .get(event)
            .into_iter()
            .flat_map(|addrs| addrs.iter().filter(|(_, h)| h.trusted > 0).map(|(m, _)| &**m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    type Model = BTreeSet<(String, String)>;

    /// `s` holds exactly the model's pairs, whatever its form.
    fn check(s: &Subs, model: &Model, events: &[&str], universe: &[(&str, String)], what: &str) {
        assert_eq!(s.len(), model.len(), "{what}: len");
        let listed: Vec<(String, String)> = s.iter().map(|(e, m)| (e.to_string(), m.to_string())).collect();
        assert_eq!(listed.len(), model.len(), "{what}: iter yields a pair twice");
        assert_eq!(listed.into_iter().collect::<Model>(), *model, "{what}: iter");
        for (e, m) in universe {
            let want = model.contains(&(e.to_string(), m.clone()));
            assert_eq!(s.contains(e, m), want, "{what}: contains({e}, {m})");
        }
        for e in events {
            let want = model.iter().any(|(me, _)| me == e);
            assert_eq!(s.has_event(e), want, "{what}: has_event({e})");
        }
    }

    /// The short and the hashed form, given the same inserts and removes, agree with a
    /// plain set after every step: first with few pairs (the short form must stay short,
    /// and be emptied), then with more than [`FEW`] (the short one switches to hashing).
    #[test]
    fn both_forms_agree_with_a_set_through_inserts_and_removes() {
        let events = ["e", "o", "x"];
        let universe: Vec<(&str, String)> =
            (0..10).flat_map(|i| events.iter().map(move |&e| (e, format!("a{i}@x")))).collect();
        let mut short = Subs::default();
        // The hashed form with nothing in it: filled past FEW, then emptied.
        let mut hashed = Subs::default();
        for i in 0..=FEW {
            hashed.insert(Rc::from("pad"), format!("p{i}@x").into());
        }
        for i in 0..=FEW {
            assert!(hashed.remove("pad", &format!("p{i}@x")));
        }
        assert!(matches!(hashed, Subs::Many(_)) && hashed.len() == 0);

        let mut model = Model::new();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut emptied = 0;
        for step in 0..4000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Phase one: 12 pairs at most, fewer than FEW; phase two: all 30.
            let pairs = if step < 2000 { 12 } else { universe.len() };
            let (e, m) = &universe[(rng >> 8) as usize % pairs];
            let key = (e.to_string(), m.clone());
            if rng % 2 == 0 {
                if !model.contains(&key) {
                    short.insert(Rc::from(*e), m.as_str().into());
                    hashed.insert(Rc::from(*e), m.as_str().into());
                    model.insert(key);
                }
            } else {
                let was = model.remove(&key);
                assert_eq!(short.remove(e, m), was, "step {step}: short remove({e}, {m})");
                assert_eq!(hashed.remove(e, m), was, "step {step}: hashed remove({e}, {m})");
            }
            if step < 2000 {
                assert!(matches!(short, Subs::Empty | Subs::Few(_)), "step {step}: the short form grew");
                if model.is_empty() {
                    assert!(matches!(short, Subs::Empty), "step {step}: an emptied short form");
                    emptied += 1;
                }
            }
            check(&short, &model, &events, &universe, &format!("step {step}, short"));
            check(&hashed, &model, &events, &universe, &format!("step {step}, hashed"));
        }
        assert!(emptied > 0, "the short form was never emptied");
        assert!(matches!(short, Subs::Many(_)), "the short form never switched to hashing");
    }

    /// The live addresses of `event` by a scan of every connection's pairs, as the
    /// offline policy once found them on each PUB.
    fn scan(conns: &[Subs], event: &str) -> BTreeSet<String> {
        conns
            .iter()
            .flat_map(|s| s.iter())
            .filter(|(e, _)| &**e == event)
            .map(|(_, m)| m.to_string())
            .collect()
    }

    /// Connections take and drop pairs (several holding the same address, one holding
    /// many); the index kept up to date, and one built afresh, always agree with a scan.
    #[test]
    fn live_addresses_agree_with_a_scan_of_every_connection() {
        let events = ["e", "o", "x"];
        let mut conns: Vec<Subs> = (0..5).map(|_| Subs::default()).collect();
        let mut live = LiveAddrs::default();
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        for step in 0..6000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let c = (rng >> 4) as usize % conns.len();
            let e = events[(rng >> 12) as usize % events.len()];
            // Connection 0 gets many addresses (the hashed form); the rest share four.
            let m = format!("a{}@x", (rng >> 20) as usize % if c == 0 { 40 } else { 4 });
            match rng % 7 {
                0 if step % 50 == 0 => {
                    // The connection closes: every pair leaves at once.
                    live.remove_all(&conns[c], true);
                    conns[c] = Subs::default();
                }
                0..=3 if !conns[c].contains(e, &m) => {
                    let ev: Rc<str> = Rc::from(e);
                    conns[c].insert(Rc::clone(&ev), m.as_str().into());
                    live.add(&ev, &m, true);
                }
                _ => {
                    if conns[c].remove(e, &m) {
                        live.remove(e, &m, true);
                    }
                }
            }
            let fresh = LiveAddrs::of(conns.iter().map(|s| (s, true)));
            for e in events {
                let want = scan(&conns, e);
                let got: Vec<&str> = live.addresses(e).collect();
                assert_eq!(got.len(), want.len(), "step {step}: an address twice on {e}");
                assert_eq!(got.into_iter().map(str::to_string).collect::<BTreeSet<_>>(), want, "step {step}");
                assert_eq!(
                    fresh.addresses(e).map(str::to_string).collect::<BTreeSet<_>>(),
                    want,
                    "step {step}"
                );
            }
        }
        for c in &conns {
            live.remove_all(c, true);
        }
        assert!(live.events.is_empty(), "every pair gone, nothing left behind");
    }

    /// An address only untrusted connections hold is not live; it becomes live when a
    /// holder's pairs move to the trusted count, and the entry goes with its last holder.
    #[test]
    fn only_trusted_holders_make_an_address_live() {
        let ev: Rc<str> = Rc::from("e");
        let mut subs = Subs::default();
        subs.insert(Rc::clone(&ev), "a@x".into());
        let mut live = LiveAddrs::default();
        live.add(&ev, "a@x", false);
        live.add(&ev, "a@x", false);
        assert_eq!(live.addresses("e").count(), 0);
        live.remove_all(&subs, false);
        live.add_all(&subs, true);
        assert_eq!(live.addresses("e").collect::<Vec<_>>(), ["a@x"]);
        live.remove("e", "a@x", true);
        assert_eq!(live.addresses("e").count(), 0);
        live.remove("e", "a@x", false);
        assert!(live.events.is_empty());
        let both = LiveAddrs::of([(&subs, false), (&subs, true)].into_iter());
        assert_eq!(both.addresses("e").collect::<Vec<_>>(), ["a@x"]);
    }

    /// The hashed form reserves room for at most twice its pairs, and gives the room
    /// back once most pairs are gone.
    #[test]
    fn the_hashed_form_holds_room_for_what_it_holds() {
        let mut s = Subs::default();
        let ev: Rc<str> = Rc::from("e");
        let cap = |s: &Subs| match s {
            Subs::Many(m) => (m.0.capacity(), m.0.len()),
            _ => panic!("not hashed"),
        };
        for i in 0..1000 {
            s.insert(Rc::clone(&ev), format!("a{i}@x").into());
            if i < FEW {
                continue;
            }
            let (c, n) = cap(&s);
            assert!(c <= 2 * n.max(2 * FEW), "{n} pairs, room for {c}");
        }
        for i in 10..1000 {
            assert!(s.remove("e", &format!("a{i}@x")));
        }
        let (c, n) = cap(&s);
        assert!(n == 10 && c <= 4 * FEW, "{n} pairs, room for {c}");
    }

    #[test]
    fn few_and_many_agree() {
        let mut s = Subs::default();
        let ev: Rc<str> = Rc::from("e");
        let other: Rc<str> = Rc::from("o");
        for i in 0..100 {
            let email = format!("a{i}@x");
            assert!(!s.contains("e", &email));
            s.insert(Rc::clone(if i % 2 == 0 { &ev } else { &other }), email.clone().into());
            assert!(s.contains(if i % 2 == 0 { "e" } else { "o" }, &email));
            assert_eq!(s.len(), i + 1);
        }
        assert!(s.has_event("e") && s.has_event("o") && !s.has_event("x"));
        for i in (1..100).step_by(2) {
            assert!(s.remove("o", &format!("a{i}@x")));
        }
        assert!(!s.has_event("o"));
        assert!(!s.remove("o", "a1@x"));
        assert_eq!(s.iter().count(), 50);
        assert!(s.iter().all(|(e, _)| &**e == "e"));
    }
}
