//! `IotPolicyBinding` -> the policy engine's input.

use crate::api::{IotPolicyBindingSpec, IotPolicyBindingStatus};
use crate::policy::{BindingInput, Memory};

/// The engine's view of a binding, with what earlier syncs recorded.
pub fn engine_input(spec: &IotPolicyBindingSpec, memory: Memory) -> BindingInput {
    BindingInput {
        policy_name: spec.policy.name.clone(),
        document: spec.policy.document.clone(),
        targets: spec.explicit_targets(),
        pools: spec.principals.cognito_identity_pools.clone(),
        memory,
    }
}

/// What operator versions before 0.3 kept in status: read once, until the first record is
/// written to the binding's ledger.
pub fn legacy_memory(status: &IotPolicyBindingStatus) -> Memory {
    Memory {
        targets: status.applied_targets.iter().cloned().collect(),
        pools: status.applied_pools.iter().cloned().collect(),
        foreign: status.foreign_targets.iter().cloned().collect(),
    }
}
