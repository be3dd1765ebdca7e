//! The custom resources: `IotPolicyBinding` and `TopicBridge` (group `iot.operator.dev`,
//! version `v1alpha1`). These types are the public contract: their doc comments are what
//! `kubectl explain` shows.

pub mod binding;
pub mod bridge;
pub mod common;
pub mod crd;
pub mod schema;

pub use binding::{
    DeletionPolicy, IotPolicyBinding, IotPolicyBindingSpec, IotPolicyBindingStatus, PolicySpec,
    Principals, RecordStatus, TargetFailure,
};
pub use bridge::{
    AwsCredentialsSource, AwsIotSource, CognitoCredentials, ConnectionState, Direction,
    MqttEndpoint, MqttVersion, RetainHandling, Route, SinkSpec, SourceSpec, TopicBridge,
    TopicBridgeSpec, TopicBridgeStatus,
};
pub use common::{Condition, ConditionStatus, SecretKeyRef, SpecError};

/// API group of both kinds.
pub const GROUP: &str = "iot.operator.dev";
/// Finalizer the operator puts on objects it must clean up after.
pub const FINALIZER: &str = "iot.operator.dev/cleanup";
