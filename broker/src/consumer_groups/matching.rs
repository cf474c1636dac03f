//! Whether a message matches a consumer group's bindings.
//!
//! Semantics follow AMQP 0-9-1 exchanges:
//!
//! - **fanout**: every message.
//! - **direct**: the message's routing key equals the binding's key (byte for byte).
//! - **topic**: the binding's key is a pattern. Pattern and routing key are
//!   `.`-separated words; `*` matches exactly one word, `#` zero or more words, any
//!   other word only itself. The empty string is zero words (as in RabbitMQ), so `#`
//!   matches the empty routing key and `*` does not; `a..b` has an empty middle word.
//!   `*` or `#` inside a longer word (`a*`) is an ordinary word here; validation
//!   rejects such patterns before they reach the cluster state.
//! - **headers**: [`HeadersMatch::All`]: every header of the binding is present in
//!   the message with an equal value (a binding without headers matches every
//!   message, as "all of nothing" is vacuously true). [`HeadersMatch::Any`]: at least
//!   one is; a binding without headers matches no message — "any of nothing" is false,
//!   and matching everything would silently turn a mistyped binding into a fanout.
//!
//! The message's topic is not an input: callers pass the bindings of the topic the
//! message was read from (a binding's `topic` field selects them).

use std::collections::HashMap;

use crate::cluster_state::model::{BindingSpec, ExchangeType, HeadersMatch};

/// Whether the message (routing key and headers) matches one binding.
pub fn matches(binding: &BindingSpec, routing_key: &str, headers: &HashMap<String, String>) -> bool {
    match binding.exchange_type {
        ExchangeType::Fanout => true,
        ExchangeType::Direct => binding.routing_key == routing_key,
        ExchangeType::Topic => topic_matches(&binding.routing_key, routing_key),
        ExchangeType::Headers => {
            let equal = |(k, v): (&String, &String)| headers.get(k) == Some(v);
            match binding.headers_match {
                HeadersMatch::All => binding.headers.iter().all(equal),
                HeadersMatch::Any => binding.headers.iter().any(equal),
            }
        }
    }
}

/// Whether the binding matches every message whatever its routing key and headers
/// (so a reader need not decode a message to match it).
pub fn matches_every_message(binding: &BindingSpec) -> bool {
    match binding.exchange_type {
        ExchangeType::Fanout => true,
        ExchangeType::Headers => binding.headers_match == HeadersMatch::All && binding.headers.is_empty(),
        ExchangeType::Direct | ExchangeType::Topic => false,
    }
}

/// Whether the message matches at least one of the bindings: a group delivers a
/// message once however many of its bindings it matches, so this is the only
/// question the group asks. Stops at the first match.
pub fn matches_any<'a>(
    bindings: impl IntoIterator<Item = &'a BindingSpec>,
    routing_key: &str,
    headers: &HashMap<String, String>,
) -> bool {
    bindings.into_iter().any(|b| matches(b, routing_key, headers))
}

/// Topic pattern matching in O(pattern words x key words) time and O(1) memory.
///
/// This is the classic wildcard algorithm (`#` is a star over words, `*` a
/// single-word wildcard): walk both word lists; on `#`, remember where it stands and
/// let it match zero words; on a mismatch, go back to the most recent `#` and let it
/// swallow one more key word. Only the most recent `#` ever needs revisiting: if the
/// rest of the pattern after it can match some suffix of the key, then letting an
/// earlier `#` absorb more words cannot help, because the later `#` can absorb them
/// just as well. Each key position is thus tried at most once per `#`, so patterns
/// like `#.#.#.#.x` cannot blow up the way naive recursion does.
fn topic_matches(pattern: &str, key: &str) -> bool {
    let mut p = Words::new(pattern);
    let mut k = Words::new(key);
    // (pattern after the most recent `#`, key position where that `#` currently ends).
    let mut star: Option<(Words<'_>, Words<'_>)> = None;
    loop {
        let matched = match p.next() {
            Some("#") => {
                // Zero words for now; more on a later mismatch.
                star = Some((p, k));
                continue;
            }
            Some(pw) => matches!(k.next(), Some(kw) if pw == "*" || pw == kw),
            None if k.is_done() => return true,
            None => false,
        };
        if matched {
            continue;
        }
        let Some((p_after_star, mut k_star)) = star else {
            return false;
        };
        if k_star.next().is_none() {
            // The `#` already covers the whole rest of the key and the pattern after it
            // still fails (it needs more words than there are).
            return false;
        }
        star = Some((p_after_star, k_star));
        p = p_after_star;
        k = k_star;
    }
}

/// The `.`-separated words of a pattern or key, without allocating. `Copy`, so a
/// position can be saved and restored for backtracking.
#[derive(Clone, Copy)]
struct Words<'a> {
    /// The unread rest, or `None` once every word is read. The empty string has no
    /// words, which is why this is not simply `str::split`.
    rest: Option<&'a str>,
}

impl<'a> Words<'a> {
    fn new(s: &'a str) -> Self {
        Self { rest: (!s.is_empty()).then_some(s) }
    }

    fn is_done(&self) -> bool {
        self.rest.is_none()
    }
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        match rest.split_once('.') {
            Some((word, tail)) => {
                self.rest = Some(tail);
                Some(word)
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn binding(exchange_type: ExchangeType, routing_key: &str) -> BindingSpec {
        BindingSpec {
            topic: "t".to_string(),
            exchange_type,
            routing_key: routing_key.to_string(),
            headers: BTreeMap::new(),
            headers_match: HeadersMatch::All,
            since_unix_ms: 0,
        }
    }

    fn headers_binding(headers_match: HeadersMatch, pairs: &[(&str, &str)]) -> BindingSpec {
        BindingSpec {
            headers: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            headers_match,
            ..binding(ExchangeType::Headers, "")
        }
    }

    fn hmap(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The keys of `candidates` that `pattern` matches.
    fn topic_selects<'a>(pattern: &str, candidates: &[&'a str]) -> Vec<&'a str> {
        let b = binding(ExchangeType::Topic, pattern);
        candidates.iter().copied().filter(|k| matches(&b, k, &HashMap::new())).collect()
    }

    #[test]
    fn fanout_matches_everything() {
        let b = binding(ExchangeType::Fanout, "");
        assert!(matches(&b, "", &HashMap::new()));
        assert!(matches(&b, "a.b", &hmap(&[("x", "1")])));
    }

    #[test]
    fn direct_needs_an_equal_key() {
        let b = binding(ExchangeType::Direct, "orders.eu");
        assert!(matches(&b, "orders.eu", &HashMap::new()));
        assert!(!matches(&b, "orders.us", &HashMap::new()));
        assert!(!matches(&b, "orders.eu.x", &HashMap::new()));
        assert!(!matches(&b, "Orders.eu", &HashMap::new()));
        assert!(!matches(&b, "", &HashMap::new()));
        // Wildcards mean nothing to a direct binding.
        assert!(!matches(&binding(ExchangeType::Direct, "orders.*"), "orders.eu", &HashMap::new()));
        assert!(matches(&binding(ExchangeType::Direct, "orders.*"), "orders.*", &HashMap::new()));
    }

    /// The acceptance examples of issue #4.
    #[test]
    fn topic_star_and_hash_examples() {
        let keys = ["a.x", "a.y", "b.x", "a.x.y", "a"];
        assert_eq!(topic_selects("a.*", &keys), ["a.x", "a.y"]);
        assert_eq!(topic_selects("a.#", &keys), ["a.x", "a.y", "a.x.y", "a"]);
    }

    #[test]
    fn topic_hash_alone_matches_everything() {
        let keys = ["", "a", "a.b", "a.b.c", ".", "a..b"];
        assert_eq!(topic_selects("#", &keys), keys);
        assert_eq!(topic_selects("#.#", &keys), keys);
    }

    #[test]
    fn topic_patterns() {
        let keys = ["", "a", "b", "a.b", "b.b", "a.c", "a.x.c", "a.x.y.c", "a.b.c.d", "x.a.b", "a.b.b"];
        assert_eq!(topic_selects("#.b", &keys), ["b", "a.b", "b.b", "x.a.b", "a.b.b"]);
        assert_eq!(topic_selects("a.#.c", &keys), ["a.c", "a.x.c", "a.x.y.c"]);
        assert_eq!(topic_selects("*.*", &keys), ["a.b", "b.b", "a.c"]);
        assert_eq!(topic_selects("*", &keys), ["a", "b"]);
        assert_eq!(topic_selects("a.b", &keys), ["a.b"]);
        assert_eq!(topic_selects("*.b.#", &keys), ["a.b", "b.b", "a.b.c.d", "a.b.b"]);
        assert_eq!(topic_selects("#.a.#", &keys), ["a", "a.b", "a.c", "a.x.c", "a.x.y.c", "a.b.c.d", "x.a.b", "a.b.b"]);
        assert_eq!(topic_selects("#.*", &keys), &keys[1..]);
        assert_eq!(topic_selects("*.#.*", &keys), &keys[3..]);
        assert_eq!(topic_selects("#.b.#.b", &keys), ["b.b", "a.b.b"]);
    }

    #[test]
    fn topic_empty_words_and_empty_key() {
        // The empty key has no words: `*` needs one, `#` takes none.
        assert!(!matches(&binding(ExchangeType::Topic, "*"), "", &HashMap::new()));
        assert!(matches(&binding(ExchangeType::Topic, "#"), "", &HashMap::new()));
        // `.` is two empty words; `a..b` has an empty middle word.
        assert!(matches(&binding(ExchangeType::Topic, "*.*"), ".", &HashMap::new()));
        assert!(matches(&binding(ExchangeType::Topic, "a.*.b"), "a..b", &HashMap::new()));
        assert!(!matches(&binding(ExchangeType::Topic, "a.b"), "a..b", &HashMap::new()));
        // A trailing dot is a trailing empty word.
        assert!(!matches(&binding(ExchangeType::Topic, "a"), "a.", &HashMap::new()));
        assert!(matches(&binding(ExchangeType::Topic, "a.#"), "a.", &HashMap::new()));
    }

    #[test]
    fn topic_wildcards_inside_words_are_literal() {
        let b = binding(ExchangeType::Topic, "a*.b#");
        assert!(matches(&b, "a*.b#", &HashMap::new()));
        assert!(!matches(&b, "ax.by", &HashMap::new()));
    }

    /// Many `#`s against a long key that almost matches: naive recursion tries
    /// exponentially many splits; this must finish at once.
    #[test]
    fn topic_many_hashes_do_not_blow_up() {
        let pattern = vec!["#"; 64].join(".") + ".z";
        let key = vec!["a"; 2000].join(".");
        assert!(!matches(&binding(ExchangeType::Topic, &pattern), &key, &HashMap::new()));
        let key_z = key.clone() + ".z";
        assert!(matches(&binding(ExchangeType::Topic, &pattern), &key_z, &HashMap::new()));
        let alternating = vec!["#.a"; 64].join(".") + ".b";
        assert!(!matches(&binding(ExchangeType::Topic, &alternating), &key, &HashMap::new()));
    }

    #[test]
    fn headers_all() {
        let b = headers_binding(HeadersMatch::All, &[("format", "pdf"), ("type", "report")]);
        assert!(matches(&b, "", &hmap(&[("format", "pdf"), ("type", "report")])));
        assert!(matches(&b, "", &hmap(&[("format", "pdf"), ("type", "report"), ("extra", "1")])));
        assert!(!matches(&b, "", &hmap(&[("format", "pdf")])));
        assert!(!matches(&b, "", &hmap(&[("format", "pdf"), ("type", "log")])));
        assert!(!matches(&b, "", &HashMap::new()));
        // Names and values are compared exactly.
        assert!(!matches(&b, "", &hmap(&[("Format", "pdf"), ("type", "report")])));
    }

    #[test]
    fn headers_any() {
        let b = headers_binding(HeadersMatch::Any, &[("format", "pdf"), ("type", "report")]);
        assert!(matches(&b, "", &hmap(&[("format", "pdf")])));
        assert!(matches(&b, "", &hmap(&[("type", "report"), ("format", "zip")])));
        assert!(!matches(&b, "", &hmap(&[("format", "zip"), ("type", "log")])));
        assert!(!matches(&b, "", &HashMap::new()));
    }

    #[test]
    fn headers_empty_binding_all_matches_everything_any_nothing() {
        let all = headers_binding(HeadersMatch::All, &[]);
        let any = headers_binding(HeadersMatch::Any, &[]);
        for message in [HashMap::new(), hmap(&[("x", "1")])] {
            assert!(matches(&all, "k", &message));
            assert!(!matches(&any, "k", &message));
        }
    }

    /// The shortcut a reader takes (no decoding) agrees with `matches`: exactly the
    /// bindings that match every message claim to.
    #[test]
    fn matches_every_message_agrees_with_matches() {
        let bindings = [
            binding(ExchangeType::Fanout, ""),
            binding(ExchangeType::Direct, ""),
            binding(ExchangeType::Topic, "#"),
            binding(ExchangeType::Topic, "a.*"),
            headers_binding(HeadersMatch::All, &[]),
            headers_binding(HeadersMatch::Any, &[]),
            headers_binding(HeadersMatch::All, &[("x", "1")]),
        ];
        let messages = [("", HashMap::new()), ("a.b", hmap(&[("x", "1")])), ("z", hmap(&[("y", "2")]))];
        for b in &bindings {
            if matches_every_message(b) {
                assert!(messages.iter().all(|(k, h)| matches(b, k, h)), "{b:?}");
            }
        }
        let claimed: Vec<bool> = bindings.iter().map(matches_every_message).collect();
        assert_eq!(claimed, [true, false, false, false, true, false, false]);
    }

    #[test]
    fn headers_ignore_the_routing_key() {
        let b = BindingSpec { routing_key: "ignored".to_string(), ..headers_binding(HeadersMatch::All, &[("a", "1")]) };
        assert!(matches(&b, "something.else", &hmap(&[("a", "1")])));
    }

    #[test]
    fn matches_any_is_an_or_over_bindings() {
        let bindings = [
            binding(ExchangeType::Direct, "x"),
            binding(ExchangeType::Topic, "a.*"),
            headers_binding(HeadersMatch::Any, &[("k", "v")]),
        ];
        let none = HashMap::new();
        assert!(matches_any(&bindings, "x", &none));
        assert!(matches_any(&bindings, "a.b", &none));
        assert!(matches_any(bindings.iter(), "zzz", &hmap(&[("k", "v")])));
        assert!(!matches_any(bindings.iter(), "zzz", &none));
        // Matching several bindings is still one yes.
        assert!(matches_any(&bindings, "a.x", &hmap(&[("k", "v")])));
        assert!(!matches_any(std::iter::empty(), "x", &none));
    }

    /// Obviously correct and exponential: try every way to match.
    fn reference(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| reference(rest, &key[skip..])),
            Some((&p, rest)) => match key.split_first() {
                Some((&k, key_rest)) => (p == "*" || p == k) && reference(rest, key_rest),
                None => false,
            },
        }
    }

    fn words(s: &str) -> Vec<&str> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split('.').collect()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Small alphabets make matches common, so both outcomes are exercised.
        #[test]
        fn topic_matches_like_the_reference(
            pattern in proptest::collection::vec(prop_oneof![Just("#"), Just("*"), Just("a"), Just("b"), Just("")], 0..7),
            key in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c"), Just("")], 0..9),
        ) {
            let pattern = pattern.join(".");
            let key = key.join(".");
            // Compare on the strings' own word lists: joining [""] gives "", which has
            // no words, exactly as the matcher reads it.
            let expected = reference(&words(&pattern), &words(&key));
            prop_assert_eq!(
                matches(&binding(ExchangeType::Topic, &pattern), &key, &HashMap::new()),
                expected,
                "pattern {:?} key {:?}", pattern, key
            );
        }

        /// Every key matches a pattern made from it by replacing words with `*` or
        /// inserting `#` anywhere.
        #[test]
        fn topic_generalized_key_matches(
            key in proptest::collection::vec("[a-c]{1,2}", 1..8),
            edits in proptest::collection::vec(0u8..4, 8),
        ) {
            let mut pattern: Vec<String> = Vec::new();
            for (word, edit) in key.iter().zip(&edits) {
                match edit {
                    0 => pattern.push("*".to_string()),
                    1 => { pattern.push("#".to_string()); pattern.push(word.clone()); }
                    _ => pattern.push(word.clone()),
                }
            }
            let b = binding(ExchangeType::Topic, &pattern.join("."));
            prop_assert!(matches(&b, &key.join("."), &HashMap::new()));
        }
    }
}
