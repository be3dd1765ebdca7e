//! The custom resources: `IotPolicyBinding` and `TopicBridge` (group `iot.operator.dev`,
//! version `v1alpha1`). These types are the public contract: their doc comments are what
//! `kubectl explain` shows.

pub mod common;
pub mod crd;
pub mod policy_binding;
pub mod schema;
pub mod topic_bridge;

pub use common::{Condition, ConditionStatus, SecretKeyRef, SpecError};
pub use policy_binding::{
    DeletionPolicy, IotPolicyBinding, IotPolicyBindingSpec, IotPolicyBindingStatus, PolicySpec,
    Principals, RecordStatus, SyncProgressStatus, TargetFailure,
};
pub use topic_bridge::{
    AwsCredentialsSource, AwsIotSource, BridgeDeletionPolicy, CognitoCredentials, ConnectionState,
    ConnectionStatus, Direction, MqttEndpoint, MqttVersion, RetainHandling, Route,
    SessionSubscriptions, SinkSpec, SourceSpec, TopicBridge, TopicBridgeSpec, TopicBridgeStatus,
};

/// API group of both kinds.
pub const GROUP: &str = "iot.operator.dev";
/// Finalizer the operator puts on objects it must clean up after.
pub const FINALIZER: &str = "iot.operator.dev/cleanup";
