//! Logging, Prometheus metrics and the HTTP endpoints (`/healthz`, `/readyz`, `/metrics`).

pub mod http;
pub mod logging;
pub mod metrics;

pub use metrics::Metrics;
