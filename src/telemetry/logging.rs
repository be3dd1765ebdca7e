//! `tracing` set-up: text or JSON lines on stderr, filtered by level.
//!
//! Objects are named by spans, not by each log call: `#[instrument]` on the reconcilers, the
//! policy sync, the status writers and the shard steps; the relay's tasks make their span once
//! and name it as their events' parent (a span entered on every poll costs on every message). The JSON lines carry the fields of every enclosing span at the top level,
//! beside the event's own, so that a collector finds `bridge`, `binding` or `side` on every line
//! as before; `span` and `spans` (the current span, and all of them from the root) stay too.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `level` is a tracing filter such as `info` or
/// `info,iot_operator=debug`. Returns an error if the filter does not parse.
pub fn init(format: LogFormat, level: &str) -> Result<(), LoggingError> {
    let filter = EnvFilter::try_new(level).map_err(|source| LoggingError::Filter {
        level: level.to_owned(),
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .try_init(),
    };
    result.map_err(LoggingError::Install)
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("--log-level '{level}': {source}")]
    Filter {
        level: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("installing the logger: {0}")]
    Install(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One JSON object per event: timestamp, level, the fields of the enclosing spans (outermost
/// first, inner ones win), the event's fields (`message` included), target, and the `span` and
/// `spans` objects of tracing-subscriber's own JSON format.
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let mut fields = span
                    .extensions()
                    .get::<FormattedFields<N>>()
                    .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                    .unwrap_or_default();
                line.extend(fields.clone());
                fields.insert("name".into(), Value::String(span.name().to_owned()));
                spans.push(Value::Object(fields));
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().to_owned()),
        );
        if let Some(current) = spans.last() {
            line.insert("span".into(), current.clone());
            line.insert("spans".into(), Value::Array(spans));
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Records an event's fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{Map, Value};
    use tracing_subscriber::fmt::MakeWriter;

    use super::FlatJson;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn lines(buffer: &Buffer) -> Vec<Map<String, Value>> {
        String::from_utf8(buffer.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The same events, once as the log call named the object itself (what lines looked like
    /// before spans) and once inside a span that names it.
    fn log_the_old_way() {
        tracing::warn!(
            bridge = "ns/b",
            side = "source",
            error = "reset",
            attempt = 3u64,
            "connection lost"
        );
    }

    fn log_in_spans() {
        let relay = tracing::info_span!("relay", bridge = "ns/b");
        let _r = relay.enter();
        let side = tracing::info_span!("connection", side = "source");
        let _s = side.enter();
        tracing::warn!(error = "reset", attempt = 3u64, "connection lost");
    }

    /// The relay's hot tasks name their span as the events' parent instead of entering it.
    fn log_with_a_parent() {
        let connection = tracing::info_span!("connection", bridge = "ns/b", side = "source");
        tracing::warn!(parent: &connection, error = "reset", attempt = 3u64, "connection lost");
    }

    #[test]
    fn json_lines_keep_every_field_they_had_when_objects_are_named_by_spans() {
        // Before: tracing-subscriber's JSON, event fields flattened, the object in the event.
        let before = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(before.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log_the_old_way);
        // Now: the object in spans.
        let now = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(FlatJson)
            .with_writer(now.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            log_in_spans();
            log_with_a_parent();
        });
        let (before, now) = (lines(&before), lines(&now));
        assert_eq!((before.len(), now.len()), (1, 2));
        for line in &now {
            for (key, value) in &before[0] {
                if key == "timestamp" {
                    assert!(line.contains_key(key));
                } else {
                    assert_eq!(line.get(key), Some(value), "field {key}: {line:?}");
                }
            }
        }
        assert_eq!(now[0]["span"]["name"], "connection");
        assert_eq!(now[0]["spans"][0]["bridge"], "ns/b");
    }
}
