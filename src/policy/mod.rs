//! The policy-sync engine: observes AWS IoT policy attachments, plans the difference to the
//! desired state (a pure function), and applies it. No Kubernetes types: the controller and the
//! `attach` command feed it plain specs and read plain reports.

pub mod canonical;
pub mod conflict;
pub mod engine;
pub mod fake;
pub mod iam;
pub mod iot_api;
pub mod memory;
pub mod plan;

pub use engine::{
    BindingInput, PolicyEngine, PolicyRemoval, Protection, SyncMode, SyncOutcome, SyncReport,
};
pub use iot_api::{AwsError, AwsErrorKind, IotApi, PolicyInfo, PolicyVersion};
pub use memory::{Journal, JournalError, Memory, NoJournal, SyncProgress};
pub use plan::{Observed, Plan, PlanInput};
