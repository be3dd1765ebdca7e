//! TopicBridge controller: validate -> build (Secrets) -> run the relay -> mirror its state into
//! status and Events. A relay whose TopicBridge is gone is stopped by a periodic sweep.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::Resource;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use super::bridge_status::{StatusWriter, Unit, patch_connection, patch_status};
use super::events::publish;
use super::{Context, Error, ReconcileTimer};
use crate::api::{
    Condition, ConditionStatus, ConnectionState, SessionSubscriptions, SpecError, TopicBridge,
};
use crate::convert::topic_bridge::{
    BuildError, BuiltRelay, SecretError, SecretFuture, SecretSource, build_relay,
};
use crate::relay::{ConnectionKey, Side};

pub const CONTROLLER: &str = "topicbridge";
/// How often counters are written to status at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The annotation by which a Secret lets TopicBridges of its namespace use it: a comma-separated
/// list of bridge names (globs, `*` for all). The operator may read any Secret, the people who
/// write TopicBridges perhaps none: without the Secret's own consent, a bridge could send a
/// value its author cannot read to a broker of their choosing.
pub const SECRET_CONSENT_ANNOTATION: &str = "iot.operator.dev/topic-bridges";

/// Whether a Secret with these annotations lets bridge `bridge` use it.
pub fn secret_allows(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    bridge: &str,
) -> bool {
    annotations
        .and_then(|a| a.get(SECRET_CONSENT_ANNOTATION))
        .is_some_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|p| !p.is_empty() && crate::tenancy::glob_match(p, bridge))
        })
}

/// Secrets of one namespace, read through the API server on behalf of one TopicBridge, which
/// each Secret must name in its [`SECRET_CONSENT_ANNOTATION`].
pub struct KubeSecrets {
    api: Api<KubeSecret>,
    bridge: String,
}

impl KubeSecrets {
    pub fn new(client: Client, namespace: &str, bridge: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            bridge: bridge.to_owned(),
        }
    }
}

impl SecretSource for KubeSecrets {
    fn get<'a>(&'a self, name: &'a str, key: &'a str) -> SecretFuture<'a> {
        Box::pin(async move {
            let secret = self
                .api
                .get_opt(name)
                .await
                .map_err(|e| SecretError::Other {
                    name: name.to_owned(),
                    source: crate::error::Source::new(e),
                })?;
            let secret = secret.ok_or_else(|| SecretError::NotFound {
                name: name.to_owned(),
            })?;
            // Consent is checked before the value is looked at.
            if !secret_allows(secret.metadata.annotations.as_ref(), &self.bridge) {
                return Err(SecretError::NotAllowed {
                    name: name.to_owned(),
                    message: format!(
                        "Secret '{name}' does not let TopicBridge '{}' use it: annotate the \
                         Secret with {SECRET_CONSENT_ANNOTATION}: {} (or a list or glob that \
                         matches it)",
                        self.bridge, self.bridge
                    ),
                });
            }
            secret
                .data
                .and_then(|mut d| d.remove(key))
                .map(|b| b.0)
                .ok_or_else(|| SecretError::MissingKey {
                    name: name.to_owned(),
                    key: key.to_owned(),
                })
        })
    }
}

fn key_of(tb: &TopicBridge) -> String {
    key_of_meta(tb.meta())
}

/// The relay key of a bridge: `namespace/name`.
pub fn key_of_meta(meta: &kube::api::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// The controller's entry point: malformed objects are reported (a running relay is left as
/// it is: its desired state cannot be read), the others reconciled.
pub async fn reconcile_guarded(
    obj: Arc<DeserializeGuard<TopicBridge>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.gate.is_open() {
        // The lease is not valid now. Deposed, this controller is about to stop (the new leader
        // reconciles); lapsed, the same term may carry on: look again then, so that a change
        // seen meanwhile is not dropped.
        return Ok(Action::requeue(super::GATE_SHUT_RETRY));
    }
    let key = key_of_meta(obj.meta());
    // Malformed objects: their first connection reports them.
    let connections = obj.0.as_ref().map_or(1, |tb| tb.spec.connection_count());
    let here = connections_here(&ctx, &key, connections);
    if here.is_empty() {
        // Connections the bridge no longer has (fewer asked for) are gone for good.
        if obj.0.is_ok() {
            for k in ctx
                .relays
                .retire_where(|k| k.of(&key) && k.index() >= connections)
                .await
            {
                ctx.status_writers.remove(&k);
                tracing::info!(bridge = %k, "retired a connection the bridge no longer has");
            }
        }
        // Other replicas run it (bridges spread over replicas); this one is told when it
        // takes a connection over. Nothing of it may run here meanwhile.
        for key in ctx.status_writers.remove_bridge(&key) {
            tracing::debug!(bridge = %key, "status writer stopped");
        }
        for stopped in ctx.relays.abort_where(|k| k.of(&key)).await {
            tracing::info!(bridge = %stopped, "stopped a connection this replica no longer runs");
        }
        return Ok(Action::await_change());
    }
    match &obj.0 {
        Ok(tb) => reconcile(Arc::new(tb.clone()), ctx).await,
        Err(invalid) if here.contains(&0) => {
            super::malformed::report::<TopicBridge>(&obj, invalid, &ctx, CONTROLLER).await
        }
        Err(_) => Ok(Action::await_change()),
    }
}

/// The connections of bridge `key` this replica runs (all of them without sharding).
fn connections_here(ctx: &Context, key: &str, connections: usize) -> Vec<usize> {
    (0..connections)
        .filter(|&i| ctx.runs_bridge(&ConnectionKey::new(key, i)))
        .collect()
}

/// Stops every relay of bridge `key` but the connections in `keep`, draining them. Those
/// numbered `connections` or above are gone for good and retire (leave their shared
/// subscriptions first); the others may run again, here or on another replica.
async fn stop_connections(ctx: &Context, key: &str, keep: &[usize], connections: usize) -> bool {
    let retired = ctx
        .relays
        .retire_where(|k| k.of(key) && k.index() >= connections)
        .await;
    let stopped = ctx
        .relays
        .retain(|k| !k.of(key) || keep.contains(&k.index()))
        .await;
    for k in retired.iter().chain(&stopped) {
        ctx.status_writers.remove(k);
    }
    !retired.is_empty() || !stopped.is_empty()
}

/// Reconciles one bridge; every log line inside names it (`bridge`, from this span).
#[tracing::instrument(name = "reconcile", skip_all, fields(bridge = %key_of(&tb)))]
pub async fn reconcile(tb: Arc<TopicBridge>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ReconcileTimer::start(&ctx.metrics, CONTROLLER);
    let key = key_of(&tb);
    let ns = tb.namespace().unwrap_or_default();
    let api: Api<TopicBridge> = Api::namespaced(ctx.client.clone(), &ns);
    if tb.metadata.deletion_timestamp.is_some() {
        stop_connections(&ctx, &key, &[], 0).await;
        return Ok(Action::await_change());
    }
    let connections = tb.spec.connection_count();
    let here = connections_here(&ctx, &key, connections);
    // Connections no longer wanted (fewer asked for) or run elsewhere now.
    if stop_connections(&ctx, &key, &here, connections).await {
        tracing::info!("stopped connections this replica no longer runs");
    }
    if here.is_empty() {
        return Ok(Action::await_change());
    }
    if here.contains(&0) {
        forget_connections(&tb, &api, &ctx, connections).await;
    }
    let routes = match tb.spec.validate() {
        Ok(r) => r,
        Err(e) => return invalid(&tb, &api, &ctx, &key, e).await,
    };
    if let Err(e) = ctx
        .settings
        .tenancy
        .check_all(&ns, crate::tenancy::bridge_requests(&tb.spec))
    {
        tracing::warn!(reason = %e, "not allowed by the tenancy rules");
        return refuse(&tb, &api, &ctx, &key, "NotAllowed", &e.to_string()).await;
    }
    let secrets: Arc<dyn SecretSource> =
        Arc::new(KubeSecrets::new(ctx.client.clone(), &ns, &tb.name_any()));
    let built = build_relay(
        &ns,
        &tb.name_any(),
        &tb.spec,
        routes,
        secrets,
        &ctx.aws,
        &ctx.settings.relay,
    )
    .await;
    let built = match built {
        Ok(b) => b,
        Err(BuildError::Invalid(e)) => {
            return invalid(&tb, &api, &ctx, &key, e).await;
        }
        Err(BuildError::Secret { field, source }) => {
            let reason = source.condition_reason();
            let msg = format!("{field}: {source}");
            // Consent withdrawn: stop using the value now. (A Secret that cannot be read for a
            // while leaves a running relay as it is.)
            if matches!(source, SecretError::NotAllowed { .. })
                && stop_connections(&ctx, &key, &[], tb.spec.connection_count()).await
            {
                tracing::info!(reason, "relay stopped");
            }
            write_condition_only(&tb, &api, &ctx, reason, &msg).await?;
            // Retried with backoff: a Secret created or annotated later is picked up.
            return Err(Error::Secret { field, source });
        }
        Err(BuildError::Aws(e)) => {
            write_condition_only(&tb, &api, &ctx, "AwsConfig", &e.to_string()).await?;
            return Err(Error::AwsClient(e));
        }
    };
    for index in here {
        let unit = ConnectionKey::new(key.as_str(), index);
        let BuiltRelay {
            mut config,
            fingerprint,
        } = built.connection(index);
        if let Some(shards) = &ctx.shards {
            // Each connection attempt asks whether this replica still holds the connection.
            let (shards, unit) = (shards.clone(), unit.clone());
            config.connect_permit =
                Some(crate::relay::config::ConnectPermit(Arc::new(move || {
                    shards.owns(&unit)
                })));
        }
        // What the last relay of this bridge subscribed, as status recorded it: a relay that
        // replaces none here removes from a kept session what the spec no longer reads.
        if let Some(recorded) = tb.status.as_ref().and_then(|s| s.subscriptions.as_ref()) {
            config.source.unsubscribe = recorded.source.clone();
            config.sink.unsubscribe = recorded.sink.clone();
        }
        let subscribed = SessionSubscriptions {
            source: crate::relay::subscribed(&config, Side::Source),
            sink: crate::relay::subscribed(&config, Side::Sink),
        };
        let Some(view) = ctx.relays.ensure(&unit, fingerprint, config).await else {
            return Err(Error::NotLeader);
        };
        // A running relay keeps its status writer unless the number of connections changed,
        // which changes what the writer reports.
        if !view.started && ctx.status_writers.current(&unit, connections) {
            continue;
        }
        if view.started {
            tracing::info!(bridge = %unit, replica = %ctx.identity, "relay started");
        }
        if index == 0 && view.started {
            for field in tb.spec.insecure_tls_fields() {
                tracing::warn!(field, "TLS certificate verification is turned off");
                publish(
                    &ctx.recorder,
                    tb.as_ref(),
                    EventType::Warning,
                    "InsecureTls",
                    "Start",
                    &format!("{field} is true: the broker's TLS certificate is not verified"),
                )
                .await;
            }
        }
        let writer = StatusWriter::new(
            api.clone(),
            tb.clone(),
            ctx.clone(),
            unit.clone(),
            Unit { index, connections },
            view.stats,
            subscribed,
        );
        let writer = tokio::spawn(writer.run(view.status));
        ctx.status_writers.replace(&unit, writer, connections);
        if !view.started {
            continue;
        }
        // After the status writer has started, so that it sees the first connection happen.
        let note = if connections == 1 {
            format!("replica {} runs this bridge", ctx.identity)
        } else {
            format!(
                "replica {} runs connection {index} of this bridge",
                ctx.identity
            )
        };
        publish(
            &ctx.recorder,
            tb.as_ref(),
            EventType::Normal,
            "Running",
            "Start",
            &note,
        )
        .await;
    }
    ctx.backoff.reset(&super::object_key(tb.as_ref()));
    // Requeue to pick up rotated Secrets.
    Ok(Action::requeue(ctx.settings.resync))
}

async fn invalid(
    tb: &TopicBridge,
    api: &Api<TopicBridge>,
    ctx: &Context,
    key: &str,
    e: SpecError,
) -> Result<Action, Error> {
    tracing::info!(error = %e, "invalid spec");
    refuse(tb, api, ctx, key, "InvalidSpec", &e.to_string()).await
}

/// A bridge that must not run: stops its relay, reports `reason`, waits for a change.
async fn refuse(
    tb: &TopicBridge,
    api: &Api<TopicBridge>,
    ctx: &Context,
    key: &str,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    if stop_connections(ctx, key, &[], tb.spec.connection_count()).await {
        tracing::info!(reason, "relay stopped");
    }
    write_condition_only(tb, api, ctx, reason, message).await?;
    Ok(Action::await_change())
}

/// Ready=False with a reason, connection state Disconnected.
async fn write_condition_only(
    tb: &TopicBridge,
    api: &Api<TopicBridge>,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    if !ctx.runs_bridge(&ConnectionKey::new(key_of(tb), 0)) {
        // The replica that runs the first connection reports.
        return Ok(());
    }
    let mut status = tb.status.clone().unwrap_or_default();
    status.connections.retain(|c| c.index == 0);
    let before = Condition::find(&status.conditions, "Ready").map(|c| c.reason.clone());
    let g = tb.metadata.generation;
    Condition::upsert(
        &mut status.conditions,
        Condition::new("Ready", ConditionStatus::False, reason, message, g),
    );
    for t in ["SourceConnected", "SinkConnected"] {
        Condition::upsert(
            &mut status.conditions,
            Condition::new(
                t,
                ConditionStatus::False,
                "NotRunning",
                "the relay is not running",
                g,
            ),
        );
    }
    status.connection_state = Some(ConnectionState::Disconnected);
    status.last_error = Some(message.to_owned());
    status.observed_generation = g;
    status.replica = Some(ctx.identity.clone());
    patch_status(api, &ctx.gate, &tb.name_any(), &status).await?;
    if before.as_deref() != Some(reason) {
        publish(
            &ctx.recorder,
            tb,
            EventType::Warning,
            reason,
            "Validate",
            message,
        )
        .await;
    }
    Ok(())
}

/// Removes the status entries of connections the bridge no longer has.
async fn forget_connections(
    tb: &TopicBridge,
    api: &Api<TopicBridge>,
    ctx: &Context,
    connections: usize,
) {
    let gone = tb
        .status
        .iter()
        .flat_map(|s| &s.connections)
        .filter_map(|c| usize::try_from(c.index).ok())
        .filter(|&i| i >= connections && i > 0);
    for index in gone {
        if let Err(e) = patch_connection(api, &ctx.gate, &tb.name_any(), index, None).await {
            tracing::debug!(index, error = %e, "removing a connection's status failed");
        }
    }
}

/// The relay keys of every connection of every TopicBridge in `store` that is not being
/// deleted (a malformed object counts its first connection only).
pub fn live_connections(store: &Store<DeserializeGuard<TopicBridge>>) -> Vec<ConnectionKey> {
    store
        .state()
        .iter()
        .filter(|tb| tb.meta().deletion_timestamp.is_none())
        .flat_map(|tb| {
            let key = key_of_meta(tb.meta());
            let n = tb.0.as_ref().map_or(1, |t| t.spec.connection_count());
            (0..n).map(move |i| ConnectionKey::new(key.as_str(), i))
        })
        .collect()
}

/// Stops relays whose TopicBridge no longer exists (a deleted object never reaches reconcile):
/// at once for each key `deleted` names (the watch's Delete events), and every few seconds for
/// any relay whose object is missing from the synced store (deletions a re-list noticed).
pub fn spawn_sweeper(
    store: Store<DeserializeGuard<TopicBridge>>,
    ctx: Arc<Context>,
    mut synced: watch::Receiver<bool>,
    mut deleted: tokio::sync::mpsc::UnboundedReceiver<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let relays = &ctx.relays;
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            // Which relays to stop: `None` for all whose object is gone, or one by key.
            let wanted: Option<String> = tokio::select! {
                _ = tick.tick() => None,
                Some(key) = deleted.recv() => Some(key),
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let gone = match wanted {
                Some(key) => relays.retire_where(|k| k.of(&key)).await,
                None => {
                    let ready = *synced.borrow_and_update();
                    if !ready {
                        continue;
                    }
                    let live: HashSet<ConnectionKey> =
                        live_connections(&store).into_iter().collect();
                    relays.retire_where(|k| !live.contains(k)).await
                }
            };
            for key in gone {
                ctx.status_writers.remove(&key);
                tracing::info!(bridge = %key, "TopicBridge deleted: relay stopped");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_secret_is_used_only_by_the_bridges_it_names() {
        let with = |v: &str| BTreeMap::from([(SECRET_CONSENT_ANNOTATION.to_owned(), v.to_owned())]);
        assert!(!secret_allows(None, "feed"), "no annotation: no consent");
        assert!(!secret_allows(Some(&BTreeMap::new()), "feed"));
        assert!(secret_allows(Some(&with("feed")), "feed"));
        assert!(secret_allows(Some(&with("other, feed")), "feed"));
        assert!(secret_allows(Some(&with("fe*")), "feed"));
        assert!(secret_allows(Some(&with("*")), "feed"));
        assert!(!secret_allows(Some(&with("other")), "feed"));
        assert!(!secret_allows(Some(&with(" , ")), "feed"));
    }
}
