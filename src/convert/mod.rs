//! Custom resource -> engine input: the build step between the public contract ([`crate::api`])
//! and the engines. Loads what a spec refers to (Secrets, credentials) and builds the signers.

pub mod policy_binding;
pub mod topic_bridge;
