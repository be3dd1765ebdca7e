//! iot-operator: a Kubernetes operator for AWS IoT Core.
//!
//! - [`api`]: the custom resources (the public contract).
//! - [`policy`]: the policy-sync engine (AWS IoT attachments); no Kubernetes types.
//! - [`bridge`]: the MQTT relay engine; no Kubernetes types.
//! - [`aws`]: AWS clients, credentials, SigV4 presigning, rate limiting.
//! - [`controller`]: thin Kubernetes adapters (watch, finalizers, status, events).
//! - [`telemetry`]: logging, metrics, HTTP endpoints.
//! - [`tenancy`]: which namespace may use which policies, roles and endpoints.

pub mod api;
pub mod aws;
pub mod bridge;
pub mod build;
pub mod cli;
pub mod controller;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod policy;
pub mod telemetry;
pub mod tenancy;

/// Installs the process-wide rustls crypto provider (ring), unless one is installed already.
///
/// The dependency tree links two providers (ring, and aws-lc-rs through the AWS SDK), so rustls
/// cannot pick a default on its own, and any TLS client built without an explicit provider
/// (kube's client among them) panics. Call this before building any client; it is idempotent.
pub fn install_crypto_provider() {
    // Err means another provider is already the default, which serves just as well.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
