//! The relay engine: takes plain configuration, holds the MQTT connections, reports plain
//! state. No Kubernetes types.

pub mod config;
pub mod manager;
pub mod outbox;
pub mod refusal;
pub mod relay;
pub mod tls;
pub mod topic;

pub use config::{Endpoint, RelayConfig, RouteConfig, Secret, SignedUrl, UrlSigner};
pub use manager::RelayManager;
pub use relay::{RelayStats, RelayStatus, Side, SideState};
