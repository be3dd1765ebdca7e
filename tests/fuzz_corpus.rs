//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same bodies the
//! cargo-fuzz targets run, so what the fuzzers found stays fixed on every test run. The bodies
//! exist only with the `fuzzing` feature, which `tests/run.sh` turns on.
#![cfg(feature = "fuzzing")]

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("readable");
        let r = std::panic::catch_unwind(|| body(&data));
        assert!(r.is_ok(), "{target}: {} fails", path.display());
        n += 1;
    }
    assert!(n >= 4, "{target}: only {n} corpus entries");
}

#[test]
fn topic_filter_corpus() {
    replay("topic_filter", iot_operator::fuzzing::topic_filter);
}

#[test]
fn topic_template_corpus() {
    replay("topic_template", iot_operator::fuzzing::topic_template);
}

#[test]
fn route_loops_corpus() {
    replay("route_loops", iot_operator::fuzzing::route_loops);
}

#[test]
fn canonical_corpus() {
    replay("canonical", iot_operator::fuzzing::canonical);
}

/// The loop check does fail on a loop: routes the validator would reject, checked directly.
#[test]
fn the_loop_check_catches_a_loop() {
    use iot_operator::api::TopicBridgeSpec;
    use iot_operator::api::topic_bridge::ParsedRoute;
    use iot_operator::topic::{TopicFilter, TopicTemplate};
    let spec: TopicBridgeSpec = serde_json::from_value(serde_json::json!({
        "source": {"mqtt": {"url": "mqtt://source"}},
        "sink": {"url": "mqtt://sink"},
        "routes": [{"from": "a/#", "to": "b/{topic}"}, {"from": "b/#", "direction": "out"}],
    }))
    .unwrap();
    assert!(spec.validate().is_err(), "the validator rejects it");
    let parsed: Vec<ParsedRoute> = spec
        .routes
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let filter = TopicFilter::parse(&r.from).unwrap();
            let template = match &r.to {
                Some(t) => TopicTemplate::parse(t, &filter).unwrap(),
                None => TopicTemplate::same_topic(),
            };
            ParsedRoute {
                index,
                filter,
                template,
            }
        })
        .collect();
    let r =
        std::panic::catch_unwind(|| iot_operator::fuzzing::assert_no_loop(&spec, &parsed, "a/x"));
    assert!(r.is_err(), "a/x goes to b/a/x and back");
    iot_operator::fuzzing::assert_no_loop(&spec, &parsed, "c/x");
}
