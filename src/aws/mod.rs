//! AWS access: SDK configuration and clients, the IoT/Cognito implementation of the engine's
//! [`IotApi`](crate::policy::IotApi), the SDK's retries configured and metered, SigV4
//! presigning. No Kubernetes types.

pub mod clients;
pub mod credentials;
pub mod iot;
pub mod retry;
pub mod roles;
pub mod sigv4;

pub use clients::{AwsClients, AwsSettings};
pub use iot::SdkIot;
