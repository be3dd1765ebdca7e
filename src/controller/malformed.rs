//! Objects that no longer deserialize (written before the schema tightened, or edited around
//! validation): the watch keeps them as [`DeserializeGuard`] errors, so the other objects go on
//! being reconciled; each such object gets a `Malformed` condition and a Warning Event naming the
//! field, and is not looked at again until it changes.

use std::fmt::Debug;

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::{DeserializeGuard, NamespaceResourceScope, error_boundary::InvalidObject};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use super::events::publish;
use super::{Context, Error};
use crate::api::common::now_rfc3339;

/// Field manager of the Ready condition written for a malformed object: apart from the
/// operator's main manager, so that applying the condition alone leaves the rest of the status.
pub const MALFORMED_MANAGER: &str = "iot-operator-malformed";

/// Reports one malformed object; never fails the reconciliation (there is nothing to retry).
pub async fn report<K>(
    guard: &DeserializeGuard<K>,
    invalid: &InvalidObject,
    ctx: &Context,
    controller: &'static str,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + DeserializeOwned + Debug,
{
    if !ctx.gate.is_open() {
        return Ok(Action::await_change());
    }
    let meta = &invalid.metadata;
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
    let detail = match api.get(&name).await {
        Ok(raw) => locate::<K>(&raw).unwrap_or_else(|| invalid.error.clone()),
        Err(_) => invalid.error.clone(),
    };
    // Before validation ratcheting (Kubernetes 1.30), the API server refuses every change to an
    // object that fails the CRD's current schema, a finalizer removal included: only a change
    // that also corrects the spec goes through.
    let message = format!(
        "this {} cannot be read: {detail}. Correct the field (kubectl edit, or apply a fixed \
         manifest); until then it is skipped{}",
        K::kind(&()),
        if meta.deletion_timestamp.is_some() {
            ", and its deletion waits: the API server refuses any change to it, a finalizer \
             removal included, unless the same change corrects the field; once it is corrected \
             the operator cleans up and removes the finalizer"
        } else {
            ""
        }
    );
    tracing::warn!(controller, object = %format!("{ns}/{name}"), error = %detail, "malformed object skipped");
    let condition = serde_json::json!({
        "type": "Ready",
        "status": "False",
        "reason": "Malformed",
        "message": message,
        "lastTransitionTime": now_rfc3339(),
        "observedGeneration": meta.generation,
    });
    // Server-side apply of the Ready condition alone, under a field manager of its own: the
    // conditions are a map keyed by type, so the other conditions and the rest of the status
    // (owned by the operator's main manager) stay. The API server may refuse it when the object
    // breaks the current schema; the Event still tells.
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": {"conditions": [condition]},
    });
    if let Err(e) = api
        .patch_status(
            &name,
            &PatchParams::apply(MALFORMED_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        tracing::debug!(error = %e, "status of a malformed object not written");
    }
    // kube's recorder folds Events with the same reason and action into one series and keeps
    // the first note: the waiting deletion gets an action of its own, so its note is seen.
    let action = if meta.deletion_timestamp.is_some() {
        "Delete"
    } else {
        "Read"
    };
    publish(
        &ctx.recorder,
        guard,
        EventType::Warning,
        "Malformed",
        action,
        &message,
    )
    .await;
    Ok(Action::await_change())
}

/// Deserializes the raw object again to find the path of the offending field.
fn locate<K: DeserializeOwned>(raw: &DynamicObject) -> Option<String> {
    let value = serde_json::to_value(raw).ok()?;
    match serde_path_to_error::deserialize::<_, K>(value) {
        Ok(_) => None,
        Err(e) => Some(format!("{}: {}", e.path(), e.inner())),
    }
}
