//! iot-operator: a Kubernetes operator for AWS IoT Core.
//!
//! Layers, each importing only from the ones above it in this list (`tests/layers.rs` checks):
//!
//! 1. Leaves: [`vocab`] (words shared by the resources and the engines), [`topic`] (MQTT topic
//!    filters and templates), [`backoff`], [`ratelimit`], [`error`].
//! 2. Engines, no Kubernetes or AWS SDK types: [`policy`] (policy-sync: observe, plan, apply)
//!    and [`relay`] (the MQTT relay: connections, routing, publishing).
//! 3. [`telemetry`]: logging, the metrics registry, HTTP endpoints.
//! 4. [`aws`]: the AWS SDK behind the engines' traits, credentials, SigV4 presigning.
//! 5. [`api`]: the custom resources, the public contract (Kubernetes types, no engine types).
//! 6. [`tenancy`]: which namespace may use which policies, roles and endpoints.
//! 7. [`convert`]: custom resource -> engine input (loads Secrets, builds signers).
//! 8. [`controller`]: thin Kubernetes adapters (watch, finalizers, status, events).
//! 9. [`cli`]: the commands.

pub mod backoff;
pub mod error;
pub mod ratelimit;
pub mod topic;
pub mod vocab;

pub mod policy;
pub mod relay;

pub mod telemetry;

pub mod aws;

pub mod api;

pub mod tenancy;

pub mod convert;

pub mod controller;

pub mod cli;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

/// Installs the process-wide rustls crypto provider (ring), unless one is installed already.
///
/// The dependency tree links two providers (ring, and aws-lc-rs through the AWS SDK), so rustls
/// cannot pick a default on its own, and any TLS client built without an explicit provider
/// (kube's client among them) panics. Call this before building any client; it is idempotent.
pub fn install_crypto_provider() {
    // Err means another provider is already the default, which serves just as well.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
