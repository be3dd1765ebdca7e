//! Fuzz-target bodies, shared by the cargo-fuzz targets in `fuzz/` and by the test that replays
//! their committed corpora (`tests/fuzz_corpus.rs`), so every corpus entry is checked on every
//! test run. Each body panics when a property fails; inputs that are not valid are skipped.
//!
//! Inputs are split on NUL bytes into the strings a target needs (NUL is invalid in every MQTT
//! topic, so no meaningful string is lost).

use crate::api::TopicBridgeSpec;
use crate::api::topic_bridge::ParsedRoute;
use crate::policy::canonical::canonical_json;
use crate::topic::{Level, TopicFilter, TopicTemplate, validate_topic_name};

fn parts(data: &[u8], n: usize) -> Option<Vec<&str>> {
    let text = std::str::from_utf8(data).ok()?;
    let v: Vec<&str> = text.splitn(n, '\0').collect();
    (v.len() == n).then_some(v)
}

/// An independent matcher (recursive, over split strings) to check the relay's.
fn reference_matches(filter: &[Level], topic: &[&str]) -> bool {
    match (filter.first(), topic.first()) {
        (Some(Level::Multi), _) => true,
        (None, None) => true,
        (Some(Level::Single), Some(_)) => reference_matches(&filter[1..], &topic[1..]),
        (Some(Level::Literal(l)), Some(t)) if l == t => {
            reference_matches(&filter[1..], &topic[1..])
        }
        _ => false,
    }
}

fn spec_matches(filter: &TopicFilter, topic: &str) -> bool {
    if topic.starts_with('$') && !matches!(filter.levels().first(), Some(Level::Literal(_))) {
        return false;
    }
    let levels: Vec<&str> = topic.split('/').collect();
    reference_matches(filter.levels(), &levels)
}

/// `filter \0 filter \0 topic`: parsing, matching against a reference, overlap soundness and
/// symmetry, and the display round trip.
pub fn topic_filter(data: &[u8]) {
    let Some(p) = parts(data, 3) else { return };
    let a = TopicFilter::parse(p[0]);
    let b = TopicFilter::parse(p[1]);
    let topic = p[2];
    let topic_ok = validate_topic_name(topic).is_ok();
    for f in [&a, &b].into_iter().flatten() {
        let again = TopicFilter::parse(&f.to_string()).expect("a parsed filter parses again");
        assert_eq!(&again, f, "display round trip");
        assert!(f.overlaps(f), "{f} overlaps itself");
        if topic_ok {
            assert_eq!(
                f.matches(topic),
                spec_matches(f, topic),
                "{f} vs {topic:?} disagrees with the reference matcher"
            );
            if !f.has_wildcards() {
                assert_eq!(f.matches(topic), f.as_str() == topic, "{f} vs {topic:?}");
            }
        }
    }
    if let (Ok(a), Ok(b)) = (&a, &b) {
        assert_eq!(
            a.overlaps(b),
            b.overlaps(a),
            "overlap of {a} and {b} is symmetric"
        );
        if topic_ok && a.matches(topic) && b.matches(topic) {
            assert!(
                a.overlaps(b),
                "{a} and {b} both match {topic:?} but do not overlap"
            );
        }
    }
}

/// `filter \0 template \0 topic`: a rendered topic is a valid topic name (when non-empty) that
/// the template's output filter matches; the loop detector relies on that over-approximation.
pub fn topic_template(data: &[u8]) {
    let Some(p) = parts(data, 3) else { return };
    let Ok(filter) = TopicFilter::parse(p[0]) else {
        return;
    };
    let Ok(template) = TopicTemplate::parse(p[1], &filter) else {
        return;
    };
    let topic = p[2];
    if validate_topic_name(topic).is_err() || !filter.matches(topic) {
        return;
    }
    let rendered = template.render(topic);
    assert!(
        !rendered.contains(['+', '#']),
        "{template} rendered a wildcard from {topic:?}: {rendered:?}"
    );
    if template.is_identity() {
        assert_eq!(rendered, topic);
    }
    // A broker never delivers a `$` topic to a filter starting with a wildcard, so such a
    // rendered topic cannot close a loop through one either.
    if !rendered.starts_with('$') {
        let out = template.output_filter(&filter);
        assert!(
            out.matches(&rendered),
            "output filter {out} of {template} (from {filter}) misses {rendered:?}"
        );
    }
}

/// Route sets built from the input: when validation accepts a spec, no topic given in the input
/// may travel in a circle (an `in` route's output read back by an `out` route, or the reverse).
///
/// Input: lines `i|o <from> [to]` for up to 4 routes, then `\0`, then topics one per line.
pub fn route_loops(data: &[u8]) {
    let Some(p) = parts(data, 2) else { return };
    let mut routes = Vec::new();
    for line in p[0].lines().take(4) {
        let mut words = line.split(' ');
        let direction = match words.next() {
            Some("i") => "in",
            Some("o") => "out",
            _ => return,
        };
        let Some(from) = words.next() else { return };
        let mut route = serde_json::json!({"from": from, "direction": direction});
        if let Some(to) = words.next() {
            route["to"] = to.into();
        }
        routes.push(route);
    }
    if routes.is_empty() {
        return;
    }
    let spec: TopicBridgeSpec = match serde_json::from_value(serde_json::json!({
        "source": {"mqtt": {"url": "mqtt://source"}},
        "sink": {"url": "mqtt://sink"},
        "routes": routes,
    })) {
        Ok(s) => s,
        Err(_) => return,
    };
    let Ok(parsed) = spec.validate() else { return };
    assert_no_loop(&spec, &parsed, p[1]);
}

/// Panics when one of `topics` (one per line) can travel from one side back to it through
/// `parsed` routes.
pub fn assert_no_loop(spec: &TopicBridgeSpec, parsed: &[ParsedRoute], topics: &str) {
    for topic in topics.lines() {
        if validate_topic_name(topic).is_err() {
            continue;
        }
        for a in parsed {
            if !a.filter.matches(topic) {
                continue;
            }
            let hop = a.template.render(topic);
            let a_in = spec.routes[a.index].direction == crate::api::Direction::In;
            for b in parsed {
                let b_in = spec.routes[b.index].direction == crate::api::Direction::In;
                // b reads on the side a writes to when their directions differ.
                if a_in != b_in && b.filter.matches(&hop) {
                    panic!(
                        "accepted a loop: route {} turns {topic:?} into {hop:?}, which route {} reads back",
                        a.index, b.index
                    );
                }
            }
        }
    }
}

/// Any JSON text: the canonical form parses back to an equal value and is a fixed point.
pub fn canonical(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let c = canonical_json(&value);
    let back: serde_json::Value = serde_json::from_str(&c).expect("canonical JSON parses");
    assert_eq!(back, value, "canonical form keeps the value");
    assert_eq!(canonical_json(&back), c, "canonical form is a fixed point");
    assert!(!c.contains('\n'), "no whitespace between tokens");
}
