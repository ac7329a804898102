//! A connection's live subscriptions: (event, email) pairs.
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

#[cfg(test)]
mod tests {
    use super::*;

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
