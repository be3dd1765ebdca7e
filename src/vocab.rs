//! Words shared by the custom resources and both engines: route direction, retain handling,
//! secret values, a broker URL scheme's default port. A leaf: it imports nothing from the crate.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a route does with the retain flag.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RetainHandling {
    /// Publish with the retain flag the message arrived with.
    #[default]
    Preserve,
    /// Always publish without the retain flag.
    Clear,
    /// Do not relay messages that arrive with the retain flag set.
    SkipRetained,
}

/// Which way a route relays.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From the source (remote) to the sink (in-cluster).
    #[default]
    In,
    /// From the sink (in-cluster) to the source (remote).
    Out,
}

/// A value that must never be printed: passwords, presigned URLs (they carry a signature and a
/// session token).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Direction {
    /// `in` or `out`, as in the resource and the metrics' `direction` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// The port a broker URL of `scheme` means when it names none (`mqtt`, `mqtts`, `ws`, `wss`).
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "mqtt" => Some(1883),
        "mqtts" => Some(8883),
        "ws" => Some(80),
        "wss" => Some(443),
        _ => None,
    }
}
