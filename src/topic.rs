//! MQTT topic filters and topic templates: parsing, matching, overlap.
//!
//! Pure functions with no I/O. Matching runs on the relay's per-message path, so it works on the
//! borrowed topic string and does not allocate.

use std::collections::HashMap;
use std::fmt;

/// Longest topic or filter accepted (MQTT allows 65,535 bytes; brokers and AWS IoT allow far less).
pub const MAX_TOPIC_LEN: usize = 1024;

/// Why a topic filter or template is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("must not be empty")]
    Empty,
    #[error("is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("must not contain the NUL character")]
    Nul,
    #[error("'#' must be the last level and stand alone in it (level {level})")]
    MultiLevelPlacement { level: usize },
    #[error("'+' must stand alone in its level (level {level})")]
    SingleLevelPlacement { level: usize },
    #[error("a topic name must not contain the wildcards '+' or '#'")]
    WildcardInTopic,
    #[error("unclosed '{{' at byte {at}")]
    UnclosedPlaceholder { at: usize },
    #[error("unknown placeholder '{{{name}}}': use {{topic}} or a level number {{1}}..{{{max}}}")]
    UnknownPlaceholder { name: String, max: usize },
    #[error(
        "placeholder {{{index}}} refers to level {index}, but the filter guarantees only {max} level(s)"
    )]
    LevelOutOfRange { index: usize, max: usize },
}

/// One level of a topic filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Level {
    Literal(String),
    /// `+`: exactly one level.
    Single,
    /// `#`: this level and everything below it (also the parent level itself).
    Multi,
}

/// A parsed MQTT topic filter such as `devices/+/telemetry` or `alerts/#`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter {
    raw: String,
    levels: Vec<Level>,
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks a topic name (what a PUBLISH carries): no wildcards.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopic);
    }
    Ok(())
}

impl TopicFilter {
    /// Parses a filter, checking wildcard placement as MQTT 3.1.1 section 4.7 requires.
    pub fn parse(raw: &str) -> Result<Self, TopicError> {
        check_common(raw)?;
        let parts: Vec<&str> = raw.split('/').collect();
        let last = parts.len() - 1;
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "#" if i == last => Level::Multi,
                "#" => return Err(TopicError::MultiLevelPlacement { level: i + 1 }),
                "+" => Level::Single,
                p if p.contains('#') => {
                    return Err(TopicError::MultiLevelPlacement { level: i + 1 });
                }
                p if p.contains('+') => {
                    return Err(TopicError::SingleLevelPlacement { level: i + 1 });
                }
                p => Level::Literal(p.to_owned()),
            };
            levels.push(level);
        }
        Ok(Self {
            raw: raw.to_owned(),
            levels,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// Whether the filter contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.levels.iter().any(|l| !matches!(l, Level::Literal(_)))
    }

    /// Number of leading levels every matching topic is sure to have.
    pub fn guaranteed_levels(&self) -> usize {
        match self.levels.last() {
            Some(Level::Multi) => self.levels.len() - 1,
            _ => self.levels.len(),
        }
    }

    /// Number of `/` separators in the filter.
    pub fn slashes(&self) -> usize {
        self.levels.len() - 1
    }

    /// Whether `topic` (a topic name, no wildcards) matches this filter.
    ///
    /// Topics that start with `$` are not matched by a leading wildcard (MQTT 3.1.1, 4.7.2).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Literal(_))) {
            return false;
        }
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Multi => return true,
                Level::Single => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Level::Literal(lit) => match parts.next() {
                    Some(p) if p == lit => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }

    /// Whether some topic name exists that both filters match.
    pub fn overlaps(&self, other: &TopicFilter) -> bool {
        overlap(&self.levels, &other.levels)
    }

    /// Whether every topic name `other` matches, this filter matches too.
    pub fn covers(&self, other: &TopicFilter) -> bool {
        // A wildcard first level never matches a topic that starts with `$` (MQTT 4.7.2).
        if let (Some(Level::Single | Level::Multi), Some(Level::Literal(l))) =
            (self.levels.first(), other.levels.first())
            && l.starts_with('$')
        {
            return false;
        }
        cover(&self.levels, &other.levels)
    }
}

fn cover(by: &[Level], a: &[Level]) -> bool {
    match (by.first(), a.first()) {
        // `x/#` matches `x` and everything below it.
        (Some(Level::Multi), _) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(Level::Single), Some(Level::Multi)) => false,
        (Some(Level::Single), Some(_)) => cover(&by[1..], &a[1..]),
        (Some(Level::Literal(x)), Some(Level::Literal(y))) => x == y && cover(&by[1..], &a[1..]),
        (Some(Level::Literal(_)), Some(_)) => false,
    }
}

fn overlap(a: &[Level], b: &[Level]) -> bool {
    match (a.first(), b.first()) {
        (None, None) => true,
        // `x/#` also matches `x`, so an exhausted side overlaps a `#` on the other.
        (None, Some(Level::Multi)) | (Some(Level::Multi), None) => true,
        (None, _) | (_, None) => false,
        (Some(Level::Multi), _) | (_, Some(Level::Multi)) => true,
        (Some(Level::Literal(x)), Some(Level::Literal(y))) if x != y => false,
        _ => overlap(&a[1..], &b[1..]),
    }
}

/// Topic filters and what each stands for, looked up by topic name: a tree of filter levels, so
/// that a topic meets only the filters that share its levels, not every filter. It finds every
/// filter that [`TopicFilter::matches`] the topic (and no `$` rule is applied: callers check).
#[derive(Debug)]
pub struct FilterTree<T> {
    root: Node<T>,
}

#[derive(Debug)]
struct Node<T> {
    literal: HashMap<String, Node<T>>,
    single: Option<Box<Node<T>>>,
    /// Filters that end with `#` below this level (`x/#` also matches `x`).
    multi: Vec<T>,
    /// Filters that end at this level.
    exact: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            single: None,
            multi: Vec::new(),
            exact: Vec::new(),
        }
    }
}

impl<T> Default for FilterTree<T> {
    fn default() -> Self {
        FilterTree {
            root: Node::default(),
        }
    }
}

impl<T> FilterTree<T> {
    pub fn insert(&mut self, filter: &TopicFilter, value: T) {
        let mut node = &mut self.root;
        for level in filter.levels() {
            node = match level {
                Level::Literal(l) => node.literal.entry(l.clone()).or_default(),
                Level::Single => node.single.get_or_insert_with(Box::default),
                Level::Multi => {
                    node.multi.push(value);
                    return;
                }
            };
        }
        node.exact.push(value);
    }

    /// Calls `found` with the value of each filter that matches `topic`.
    pub fn find(&self, topic: &str, found: &mut impl FnMut(&T)) {
        find(&self.root, topic.split('/'), found);
    }
}

fn find<'a, T>(
    node: &Node<T>,
    mut levels: impl Iterator<Item = &'a str> + Clone,
    found: &mut impl FnMut(&T),
) {
    node.multi.iter().for_each(&mut *found);
    match levels.next() {
        None => node.exact.iter().for_each(found),
        Some(level) => {
            if let Some(child) = node.literal.get(level) {
                find(child, levels.clone(), found);
            }
            if let Some(child) = &node.single {
                find(child, levels, found);
            }
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// A piece of a topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// `{topic}`: the whole source topic.
    Topic,
    /// `{n}`: level n (1-based) of the source topic.
    Level(usize),
}

/// A destination topic template such as `bridge/{topic}` or `site/{2}/telemetry`.
///
/// `{topic}` stands for the whole matched topic, `{n}` for its n-th level (counted from 1). A
/// template without placeholders is a fixed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    raw: String,
    pieces: Vec<Piece>,
}

impl TopicTemplate {
    /// The identity template: publish on the topic the message came with.
    pub fn same_topic() -> Self {
        Self {
            raw: "{topic}".to_owned(),
            pieces: vec![Piece::Topic],
        }
    }

    /// Parses a template and checks it against the filter whose matches it renders.
    pub fn parse(raw: &str, from: &TopicFilter) -> Result<Self, TopicError> {
        check_common(raw)?;
        let max = from.guaranteed_levels();
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = raw;
        let mut offset = 0;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or(TopicError::UnclosedPlaceholder { at: offset + open })?;
            let name = &after[..close];
            let piece = match name {
                "topic" => Piece::Topic,
                n => match n.parse::<usize>() {
                    Ok(0) | Err(_) => {
                        return Err(TopicError::UnknownPlaceholder {
                            name: n.to_owned(),
                            max,
                        });
                    }
                    Ok(i) if i > max => return Err(TopicError::LevelOutOfRange { index: i, max }),
                    Ok(i) => Piece::Level(i),
                },
            };
            if !text.is_empty() {
                check_template_text(&text, max)?;
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
            let consumed = open + 1 + close + 1;
            offset += consumed;
            rest = &rest[consumed..];
        }
        text.push_str(rest);
        check_template_text(&text, max)?;
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self {
            raw: raw.to_owned(),
            pieces,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether rendering returns the source topic unchanged.
    pub fn is_identity(&self) -> bool {
        self.pieces == [Piece::Topic]
    }

    /// Renders the destination topic for a message that arrived on `topic` into `out`.
    pub fn render_into(&self, topic: &str, out: &mut String) {
        out.clear();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Topic => out.push_str(topic),
                Piece::Level(i) => {
                    if let Some(level) = topic.split('/').nth(i - 1) {
                        out.push_str(level);
                    }
                }
            }
        }
    }

    /// Renders the destination topic for a message that arrived on `topic`.
    pub fn render(&self, topic: &str) -> String {
        let mut out = String::with_capacity(self.raw.len() + topic.len());
        self.render_into(topic, &mut out);
        out
    }

    /// A filter that matches every topic this template can produce from topics matching `from`
    /// (an over-approximation, used to detect routes that could feed each other).
    pub fn output_filter(&self, from: &TopicFilter) -> TopicFilter {
        // Render with marker characters standing for "any text", then turn each level that holds
        // a marker into `+`, and a spliced `#` into a trailing `#`.
        const ANY: char = '\u{1}';
        const REST: char = '\u{2}';
        let mut rendered = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => rendered.push_str(t),
                Piece::Level(i) => match from.levels.get(i - 1) {
                    Some(Level::Literal(l)) => rendered.push_str(l),
                    _ => rendered.push(ANY),
                },
                Piece::Topic => {
                    for (n, level) in from.levels.iter().enumerate() {
                        if n > 0 {
                            rendered.push('/');
                        }
                        match level {
                            Level::Literal(l) => rendered.push_str(l),
                            Level::Single => rendered.push(ANY),
                            Level::Multi => rendered.push(REST),
                        }
                    }
                }
            }
        }
        let mut levels = Vec::new();
        for part in rendered.split('/') {
            if let Some(at) = part.find(REST) {
                // Anything may follow: the rest of the output is unconstrained. A `#` may also
                // match no level at all (`a/#` matches `a`), and then text that follows it in
                // the same level joins the level before: that level is unconstrained too.
                if part.len() > at + REST.len_utf8()
                    && let Some(last) = levels.last_mut()
                {
                    *last = Level::Single;
                }
                levels.push(Level::Multi);
                break;
            } else if part.contains(ANY) {
                levels.push(Level::Single);
            } else {
                levels.push(Level::Literal(part.to_owned()));
            }
        }
        let raw = levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Single => "+",
                Level::Multi => "#",
            })
            .collect::<Vec<_>>()
            .join("/");
        TopicFilter { raw, levels }
    }
}

/// Literal text of a template (between placeholders) must not hold wildcards or a stray `}`.
fn check_template_text(text: &str, max: usize) -> Result<(), TopicError> {
    if text.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopic);
    }
    if text.contains('}') {
        return Err(TopicError::UnknownPlaceholder {
            name: "}".to_owned(),
            max,
        });
    }
    Ok(())
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// One route as loop detection sees it.
pub struct LoopRoute<'a> {
    /// Reads on the source and publishes on the sink (`in`); false: the reverse (`out`).
    pub inbound: bool,
    pub filter: &'a TopicFilter,
    pub template: &'a TopicTemplate,
}

/// Two routes between which a message could travel in a circle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loop {
    /// Index of the inbound route.
    pub inbound: usize,
    /// Index of the outbound route.
    pub outbound: usize,
    /// Where the circle closes: true on the sink (the outbound route reads what the inbound one
    /// publishes), false on the source (the reverse).
    pub on_sink: bool,
    /// The filter that reads it back.
    pub reads: String,
    /// What the other route publishes there, as a filter.
    pub publishes: String,
}

/// The sides whose subscriptions are noLocal (MQTT 5): a client does not receive what it
/// published itself, so no circle closes there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoLocal {
    pub source: bool,
    pub sink: bool,
}

/// The first pair of routes where what one publishes is read back by the other, if any.
pub fn find_loop(routes: &[LoopRoute<'_>], no_local: NoLocal) -> Option<Loop> {
    for (ai, a) in routes.iter().enumerate().filter(|(_, r)| r.inbound) {
        let a_out = a.template.output_filter(a.filter);
        for (bi, b) in routes.iter().enumerate().filter(|(_, r)| !r.inbound) {
            let b_out = b.template.output_filter(b.filter);
            if !no_local.sink && b.filter.overlaps(&a_out) {
                return Some(Loop {
                    inbound: ai,
                    outbound: bi,
                    on_sink: true,
                    reads: b.filter.to_string(),
                    publishes: a_out.to_string(),
                });
            }
            if !no_local.source && a.filter.overlaps(&b_out) {
                return Some(Loop {
                    inbound: ai,
                    outbound: bi,
                    on_sink: false,
                    reads: a.filter.to_string(),
                    publishes: b_out.to_string(),
                });
            }
        }
    }
    None
}

/// A route that reads back what a route of the same direction publishes, on a broker that is
/// both source and sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfFeed {
    /// Index of the route that publishes.
    pub writer: usize,
    /// Index of the route that reads it back (may be the writer itself).
    pub reader: usize,
    /// The reader's filter.
    pub reads: String,
    /// What the writer publishes, as a filter.
    pub publishes: String,
}

/// When source and sink are one broker, every route reads from and publishes to it: `in` routes
/// read with the source connection and publish with the sink connection, `out` routes the other
/// way round. A route of the same direction as the writer reads with the *other* connection, so
/// noLocal does not stop the circle: the first such pair, if any. (Pairs of opposite directions
/// are [`find_loop`]'s.)
pub fn find_self_feed(routes: &[LoopRoute<'_>]) -> Option<SelfFeed> {
    for (wi, w) in routes.iter().enumerate() {
        let out = w.template.output_filter(w.filter);
        for (ri, r) in routes.iter().enumerate() {
            if r.inbound == w.inbound && r.filter.overlaps(&out) {
                return Some(SelfFeed {
                    writer: wi,
                    reader: ri,
                    reads: r.filter.to_string(),
                    publishes: out.to_string(),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_filter_tree_finds_the_filters_that_match_a_topic() {
        let filters = [
            "a/b/c", "a/+/c", "a/#", "#", "+", "a/b", "a/b/+/d", "x/y", "+/+", "a/+/#",
        ];
        let mut tree = FilterTree::default();
        for (i, f) in filters.iter().enumerate() {
            tree.insert(&TopicFilter::parse(f).expect("filter"), i);
        }
        for topic in [
            "a/b/c",
            "a",
            "a/b",
            "x/y",
            "a/b/x/d",
            "b",
            "a//c",
            "",
            "a/b/c/d/e",
        ] {
            let mut found = Vec::new();
            tree.find(topic, &mut |i: &usize| found.push(*i));
            found.sort_unstable();
            let want: Vec<usize> = (0..filters.len())
                .filter(|&i| {
                    TopicFilter::parse(filters[i])
                        .expect("filter")
                        .matches(topic)
                })
                .collect();
            assert_eq!(found, want, "{topic}");
        }
    }

    #[test]
    fn a_filter_covers_what_every_topic_it_matches_would() {
        let f = |s: &str| TopicFilter::parse(s).expect("filter");
        let covers = |a: &str, b: &str| f(a).covers(&f(b));
        assert!(covers("+/+/telemetry", "devices/+/telemetry"));
        assert!(covers("devices/#", "devices"));
        assert!(covers("devices/#", "devices/+/x/#"));
        assert!(covers("#", "a/b"));
        assert!(covers("a/b", "a/b"));
        assert!(!covers("devices/+/telemetry", "+/+/telemetry"));
        assert!(!covers("a/+", "a/#"), "a/# also matches a/b/c");
        assert!(!covers("a/+", "a"));
        assert!(!covers("a/b", "a/b/c"));
        assert!(
            !covers("a/+/c", "a/b/+"),
            "they overlap; neither covers the other"
        );
        assert!(
            !covers("#", "$SYS/broker"),
            "wildcards skip topics that start with $"
        );
        assert!(!covers("+/broker", "$SYS/broker"));
        assert!(covers("$SYS/#", "$SYS/broker"));
    }

    use super::*;

    #[test]
    fn a_route_feeding_itself_on_one_broker_is_found() {
        let (a, copy) = (
            f("a/#"),
            TopicTemplate::parse("a/copy/{topic}", &f("a/#")).unwrap(),
        );
        let (b, other) = (
            f("b/#"),
            TopicTemplate::parse("c/{topic}", &f("b/#")).unwrap(),
        );
        let r = |inbound, filter, template| LoopRoute {
            inbound,
            filter,
            template,
        };
        let found = find_self_feed(&[r(true, &b, &other), r(true, &a, &copy)]).expect("a loop");
        assert_eq!((found.writer, found.reader), (1, 1));
        assert_eq!(found.publishes, "a/copy/a/#");
        assert_eq!(find_self_feed(&[r(true, &b, &other)]), None);
        // Two routes feeding each other: c/... is read back by a route reading c/#.
        let c = f("c/#");
        let to_b = TopicTemplate::parse("b/{topic}", &c).unwrap();
        let found = find_self_feed(&[r(false, &b, &other), r(false, &c, &to_b)]).expect("a loop");
        assert_eq!((found.writer, found.reader), (0, 1));
        // Opposite directions are find_loop's (noLocal may apply there).
        assert_eq!(
            find_self_feed(&[r(true, &b, &other), r(false, &c, &to_b)]),
            None
        );
    }

    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[test]
    fn parses_valid_filters() {
        for ok in [
            "a",
            "a/b",
            "+",
            "#",
            "a/+/c",
            "a/#",
            "+/+",
            "/",
            "a//b",
            "$aws/things/+/shadow/#",
        ] {
            assert!(TopicFilter::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_misplaced_wildcards() {
        assert_eq!(
            TopicFilter::parse("a/#/b"),
            Err(TopicError::MultiLevelPlacement { level: 2 })
        );
        assert_eq!(
            TopicFilter::parse("a/b#"),
            Err(TopicError::MultiLevelPlacement { level: 2 })
        );
        assert_eq!(
            TopicFilter::parse("a+/b"),
            Err(TopicError::SingleLevelPlacement { level: 1 })
        );
        assert_eq!(TopicFilter::parse(""), Err(TopicError::Empty));
        assert_eq!(TopicFilter::parse("a\0"), Err(TopicError::Nul));
        assert_eq!(
            TopicFilter::parse(&"a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn matching_follows_mqtt_rules() {
        let cases = [
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("a/+/c", "a/b/c/d", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "b", false),
            ("#", "anything/at/all", true),
            ("+", "a", true),
            ("+", "a/b", false),
            ("+/b", "/b", true),
            ("a/b", "a/b", true),
            ("a/b", "a/b/", false),
            ("#", "$SYS/broker", false),
            ("+/x", "$aws/x", false),
            ("$aws/#", "$aws/things", true),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(f(filter).matches(topic), want, "{filter} vs {topic}");
        }
    }

    #[test]
    fn overlap_is_symmetric_and_correct() {
        let cases = [
            ("a/+", "a/b", true),
            ("a/+", "b/+", false),
            ("a/#", "a", true),
            ("a/#", "+/x/y", true),
            ("a/b/c", "a/b", false),
            ("+/+", "a/b/c", false),
            ("#", "x", true),
            ("a/+/c", "a/b/+", true),
        ];
        for (x, y, want) in cases {
            assert_eq!(f(x).overlaps(&f(y)), want, "{x} ~ {y}");
            assert_eq!(f(y).overlaps(&f(x)), want, "{y} ~ {x}");
        }
    }

    #[test]
    fn templates_render_levels_and_topic() {
        let from = f("devices/+/telemetry/#");
        let t = TopicTemplate::parse("site/{2}/t/{topic}", &from).unwrap();
        assert_eq!(
            t.render("devices/d42/telemetry/temp"),
            "site/d42/t/devices/d42/telemetry/temp"
        );
        let t = TopicTemplate::parse("dev-{2}", &from).unwrap();
        assert_eq!(t.render("devices/x/telemetry"), "dev-x");
        assert!(TopicTemplate::same_topic().is_identity());
        assert_eq!(TopicTemplate::same_topic().render("a/b"), "a/b");
    }

    #[test]
    fn templates_reject_bad_placeholders() {
        let from = f("a/+/#");
        assert_eq!(
            TopicTemplate::parse("x/{3}", &from),
            Err(TopicError::LevelOutOfRange { index: 3, max: 2 })
        );
        assert!(matches!(
            TopicTemplate::parse("x/{0}", &from),
            Err(TopicError::UnknownPlaceholder { .. })
        ));
        assert!(matches!(
            TopicTemplate::parse("x/{name}", &from),
            Err(TopicError::UnknownPlaceholder { .. })
        ));
        assert_eq!(
            TopicTemplate::parse("x/{1", &from),
            Err(TopicError::UnclosedPlaceholder { at: 2 })
        );
        assert_eq!(
            TopicTemplate::parse("x/+", &from),
            Err(TopicError::WildcardInTopic)
        );
        assert!(TopicTemplate::parse("x}", &from).is_err());
        // Found by fuzzing: text before a placeholder was not checked.
        assert_eq!(
            TopicTemplate::parse("+/{1}", &from),
            Err(TopicError::WildcardInTopic)
        );
        assert_eq!(
            TopicTemplate::parse("x#{topic}", &from),
            Err(TopicError::WildcardInTopic)
        );
        assert!(TopicTemplate::parse("}{1}", &from).is_err());
    }

    /// Found by fuzzing: `{topic}` of `a/#` is just `a` for the topic `a`, so text after it
    /// joins the level `a`.
    #[test]
    fn output_filter_covers_a_multi_level_wildcard_matching_no_level() {
        let from = f("a/#");
        let t = TopicTemplate::parse("{1}-{topic})", &from).unwrap();
        let out = t.output_filter(&from);
        assert!(
            out.matches(&t.render("a")),
            "{out} misses {}",
            t.render("a")
        );
        assert!(out.matches(&t.render("a/b/c")));
        let t = TopicTemplate::parse("p/{topic}y", &from).unwrap();
        let out = t.output_filter(&from);
        assert_eq!(out.as_str(), "p/+/#");
        assert!(out.matches(&t.render("a")));
    }

    #[test]
    fn output_filter_over_approximates() {
        let from = f("devices/+/up/#");
        let t = TopicTemplate::parse("cluster/{topic}", &from).unwrap();
        assert_eq!(t.output_filter(&from).as_str(), "cluster/devices/+/up/#");
        let t = TopicTemplate::parse("x/{2}/{1}", &from).unwrap();
        assert_eq!(t.output_filter(&from).as_str(), "x/+/devices");
        let t = TopicTemplate::parse("x/pre-{2}-post/y", &from).unwrap();
        assert_eq!(t.output_filter(&from).as_str(), "x/+/y");
        let t = TopicTemplate::parse("fixed/topic", &from).unwrap();
        assert_eq!(t.output_filter(&from).as_str(), "fixed/topic");
        // Every rendered topic matches the output filter.
        for topic in ["devices/a/up", "devices/b/up/c/d"] {
            for tpl in ["cluster/{topic}", "x/{2}/{1}", "x/pre-{2}-post/y"] {
                let t = TopicTemplate::parse(tpl, &from).unwrap();
                assert!(
                    t.output_filter(&from).matches(&t.render(topic)),
                    "{tpl} {topic}"
                );
            }
        }
    }
}
