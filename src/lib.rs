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
#[doc(hidden)]
pub mod fuzzing;
pub mod policy;
pub mod telemetry;
pub mod tenancy;
