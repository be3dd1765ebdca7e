//! Types shared by both kinds: conditions, Secret references, spec errors.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A validation failure of a spec, naming the field (as a JSON path below `spec`) and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Path of the offending field, e.g. `spec.routes[2].from`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
    /// The parser's own error, when one found the problem (its text is in `message`).
    #[source]
    pub source: Option<crate::error::Source>,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            source: None,
        }
    }

    /// As [`SpecError::new`], keeping the error that found the problem as the source.
    pub fn caused_by(
        field: impl Into<String>,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            source: Some(crate::error::Source::new(source)),
            ..Self::new(field, message)
        }
    }
}

/// Status of a condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A status condition in the standard Kubernetes shape (read by kubectl wait, Argo CD, Flux, kstatus).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    #[schemars(
        length(min = 1, max = 316),
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
        )
    )]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Machine-readable reason in CamelCase, e.g. `InvalidSpec`.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,
    /// Human-readable explanation.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

/// The longest condition message the API accepts (as `metav1.Condition`).
pub const MAX_CONDITION_MESSAGE: usize = 32768;

impl Condition {
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        generation: Option<i64>,
    ) -> Self {
        let mut message = message.into();
        if message.len() > MAX_CONDITION_MESSAGE {
            let mut end = MAX_CONDITION_MESSAGE - 3;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("...");
        }
        Self {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            last_transition_time: now_rfc3339(),
            observed_generation: generation,
        }
    }

    /// Replaces or inserts `new` in `list`, keeping the old transition time when the status did
    /// not change.
    pub fn upsert(list: &mut Vec<Condition>, mut new: Condition) {
        if let Some(old) = list.iter_mut().find(|c| c.type_ == new.type_) {
            if old.status == new.status {
                new.last_transition_time = std::mem::take(&mut old.last_transition_time);
            }
            *old = new;
        } else {
            list.push(new);
        }
    }

    /// Finds the condition of a type.
    pub fn find<'a>(list: &'a [Condition], type_: &str) -> Option<&'a Condition> {
        list.iter().find(|c| c.type_ == type_)
    }
}

/// The current time as RFC 3339 with second precision.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

/// A key of a Secret in the same namespace as the object that refers to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (in the object's own namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Schema for a free-form JSON object kept as written (`x-kubernetes-preserve-unknown-fields`).
pub fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema for the conditions list: a map keyed by `type`, so server-side apply merges per type.
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = generator.subschema_for::<Condition>();
    schemars::json_schema!({
        "type": "array",
        "items": item,
        "maxItems": 16,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}
