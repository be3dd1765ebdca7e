//! Kubernetes adapters: watch the two kinds, hand their specs to the engines, write status and
//! Events. The engines themselves know nothing of Kubernetes.

pub mod backoff;
pub mod bridge_status;
pub mod events;
pub mod leader;
pub mod ledger;
pub mod malformed;
pub mod policy_binding;
pub mod preflight;
pub mod shard;
pub mod topic_bridge;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;

use crate::api::{ConnectionStatus, IotPolicyBinding, TopicBridge};
use crate::aws::AwsClients;
use crate::convert::topic_bridge::RelaySettings;
use crate::policy::AwsError;
use crate::relay::manager::RelayManager;
use crate::telemetry::Metrics;
use crate::telemetry::http::Readiness;
use crate::telemetry::metrics::{ControllerLabels, ErrorLabels};
use crate::tenancy::TenancyConfig;

/// How soon an object reconciled while this replica's lease is not valid is looked at again.
pub const GATE_SHUT_RETRY: Duration = Duration::from_secs(5);

/// Field manager name for server-side apply.
pub const MANAGER: &str = "iot-operator";

/// Controller settings from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// Reconciliations in flight per controller.
    pub concurrency: u16,
    /// How often every binding is synced with AWS again (drift repair, new pool identities).
    pub resync: Duration,
    /// How often a pool binding's Cognito roles are checked again while its spec is unchanged.
    pub role_check: Duration,
    /// How relays are built.
    pub relay: RelaySettings,
    /// Which namespace may use which policies, roles and endpoints.
    pub tenancy: Arc<TenancyConfig>,
    /// The operator's own namespace, where the bindings' records are kept.
    pub record_namespace: String,
    /// Which controllers run.
    pub controllers: Controllers,
}

/// Which controllers a process runs; the chart grants only what they need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controllers {
    /// IotPolicyBindings: AWS IoT policy attachments.
    pub policy: bool,
    /// TopicBridges: the relays.
    pub bridge: bool,
}

impl Default for Controllers {
    fn default() -> Self {
        Self {
            policy: true,
            bridge: true,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            concurrency: 4,
            resync: Duration::from_secs(300),
            role_check: Duration::from_secs(3600),
            relay: RelaySettings::default(),
            tenancy: Arc::new(TenancyConfig::default()),
            record_namespace: "iot-operator".into(),
            controllers: Controllers::default(),
        }
    }
}

/// Everything a reconciliation needs.
pub struct Context {
    pub client: Client,
    /// Publishes Events while [`Context::gate`] is open.
    pub recorder: events::GatedRecorder,
    /// Open while this replica may write status and Events (always, without leader election).
    pub gate: leader::WriteGate,
    pub metrics: Arc<Metrics>,
    pub backoff: backoff::Backoff,
    pub settings: Settings,
    pub aws: Arc<AwsClients>,
    /// Every IotPolicyBinding the operator sees (to protect pairs other bindings want);
    /// malformed ones are kept as errors.
    pub bindings: Store<DeserializeGuard<IotPolicyBinding>>,
    /// Every TopicBridge the operator sees, with its latest status (the entries of connections
    /// other replicas run).
    pub bridges: Store<DeserializeGuard<TopicBridge>>,
    pub relays: Arc<RelayManager>,
    pub status_writers: bridge_status::StatusWriters,
    /// Where each binding's record is kept.
    pub ledger: Arc<ledger::Ledger>,
    /// This replica's share of the TopicBridges (`--shard-bridges`); `None`: it runs them all.
    pub shards: Option<Arc<shard::Shards>>,
    /// This replica's name (its pod), shown in bridge status.
    pub identity: String,
    /// When each pool binding's Cognito roles were last checked.
    pub role_checks: policy_binding::RoleChecks,
}

impl Context {
    /// The `status.connections` entries of `tb` as last seen by the watch; `None` while the
    /// watch has not seen it (or it is malformed).
    pub fn bridge_connections(&self, tb: &TopicBridge) -> Option<Vec<ConnectionStatus>> {
        let mut key = reflector::ObjectRef::<DeserializeGuard<TopicBridge>>::new(&tb.name_any());
        key.namespace = tb.namespace();
        let latest = self.bridges.get(&key)?;
        let latest = latest.0.as_ref().ok()?;
        Some(
            latest
                .status
                .as_ref()
                .map(|s| s.connections.clone())
                .unwrap_or_default(),
        )
    }

    /// Whether this replica runs bridge `key` (always, without sharding): it holds the
    /// bridge, even while its membership has lapsed.
    pub fn runs_bridge(&self, key: &crate::relay::ConnectionKey) -> bool {
        self.shards.as_ref().is_none_or(|s| s.holds(key))
    }

    /// Whether this replica may connect and write for bridge `key` now: its gate is open and,
    /// with sharding, it holds the bridge confirmed.
    pub fn owns_bridge(&self, key: &crate::relay::ConnectionKey) -> bool {
        self.gate.is_open() && self.shards.as_ref().is_none_or(|s| s.owns(key))
    }
}

/// This replica's name: the pod's, else one made from the process id.
pub fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| format!("iot-operator-{}", std::process::id()))
}

/// Why a reconciliation failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Aws(#[from] AwsError),
    #[error("{0}")]
    Record(#[from] crate::policy::JournalError),
    #[error("{0}")]
    AwsClient(#[from] crate::aws::clients::ClientError),
    #[error("{count} target(s) could not be detached; retrying")]
    DetachIncomplete { count: usize },
    /// A Secret the bridge names cannot be used (yet): retried with backoff, so a Secret
    /// created or annotated later is picked up.
    #[error("{field}: {source}")]
    Secret {
        field: String,
        #[source]
        source: crate::convert::topic_bridge::SecretError,
    },
    /// Relays run on the leader only; this replica is not (or no longer) it.
    #[error("this replica is not the leader; relays are paused")]
    NotLeader,
}

impl Error {
    /// Short reason for the error metric.
    pub fn reason(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) => format!("Kube{}", s.code),
            Error::Kube(_) => "KubeClient".into(),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "Finalizer".into(),
            },
            Error::Aws(e) => e.kind.reason().into(),
            Error::AwsClient(_) => "AwsConfig".into(),
            Error::DetachIncomplete { .. } => "DetachIncomplete".into(),
            Error::Secret { source, .. } => source.metric_reason().into(),
            Error::NotLeader => "NotLeader".into(),
            Error::Record(_) => "RecordFailed".into(),
        }
    }
}

/// Writes `status` (anything that serializes as the object's `status`, a part of it included)
/// to object `name` with server-side apply as field manager `manager`, taking over the fields
/// it sets. The one way both controllers write status: each manager owns its own fields (the
/// main status, a running sync's progress, one bridge connection's entry).
pub async fn apply_status<K, S>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: &S,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// Key of an object for backoff bookkeeping.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&Default::default()),
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
    .replace("\"", "")
}

/// Measures one reconciliation and counts it.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    controller: &'static str,
    start: Instant,
}

impl ReconcileTimer {
    pub fn start(metrics: &Arc<Metrics>, controller: &'static str) -> Self {
        metrics
            .reconciliations
            .get_or_create(&ControllerLabels { controller })
            .inc();
        Self {
            metrics: metrics.clone(),
            controller,
            start: Instant::now(),
        }
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: self.controller,
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// The error policy both controllers share: count, log, back off per object.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    controller: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj, err, ctx| {
        ctx.metrics
            .reconcile_errors
            .get_or_create(&ErrorLabels {
                controller,
                reason: err.reason(),
            })
            .inc();
        let delay = ctx.backoff.failed(&object_key(obj.as_ref()));
        tracing::warn!(
            controller,
            object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()),
            error = %err,
            retry_in = ?delay,
            "reconcile failed"
        );
        Action::requeue(delay)
    }
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What the controllers run with; made once per process and cloned for each leadership term.
#[derive(Clone)]
pub struct Deps {
    /// For request-response calls: each has a deadline.
    pub client: Client,
    /// For watches, which idle for minutes between events.
    pub watch_client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub aws: Arc<AwsClients>,
    pub relays: Arc<RelayManager>,
    /// Open while this replica may write status and Events.
    pub gate: leader::WriteGate,
    /// This replica's share of the TopicBridges, when they are spread over replicas.
    pub shards: Option<Arc<shard::Shards>>,
}

/// Runs the selected controllers until `shutdown` changes to `true`, then lets in-flight
/// reconciliations finish and stops every relay.
pub async fn run(deps: Deps, shutdown: watch::Receiver<bool>) {
    let Deps {
        client,
        watch_client,
        settings,
        metrics,
        readiness,
        aws,
        relays,
        gate,
        shards,
    } = deps;
    let ns = settings.namespace.clone();
    // Objects that no longer deserialize arrive as errors instead of failing the whole watch.
    let bindings_api: Api<DeserializeGuard<IotPolicyBinding>> =
        api_for(&watch_client, ns.as_deref());
    let bridges_api: Api<DeserializeGuard<TopicBridge>> = api_for(&watch_client, ns.as_deref());

    // Status writes change neither generation nor finalizers, so they do not trigger a new
    // reconciliation; spec edits, finalizer changes and deletion do.

    // Readiness comes from the watch streams themselves (their first InitDone, seen after the
    // reflector has filled the store), not from `Store::wait_until_ready`: that future keeps a
    // single waker, and the Controller already waits on it, so a second waiter is never woken.
    // A controller that does not run counts as synced. Its watch is never polled, so it makes no
    // API call.
    let run = settings.controllers;
    let (bindings_synced_tx, mut bindings_synced) = watch::channel(!run.policy);
    let (bridges_synced_tx, mut bridges_synced) = watch::channel(!run.bridge);
    let (binding_store, binding_writer) = reflector::store();
    let binding_stream = watcher(bindings_api, watcher::Config::default())
        .default_backoff()
        .reflect(binding_writer)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                bindings_synced_tx.send_replace(true);
            }
        })
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            Default::default(),
        );
    let (bridge_store, bridge_writer) = reflector::store();
    // A deleted TopicBridge (it has no finalizer) never reaches reconcile: its relay is stopped
    // from the watch's Delete event at once, and by a periodic sweep over the store for deletions
    // a re-list noticed instead.
    let (deleted_tx, deleted_rx) = tokio::sync::mpsc::unbounded_channel();
    let bridge_stream = watcher(bridges_api, watcher::Config::default())
        .default_backoff()
        .reflect(bridge_writer)
        .inspect_ok(move |event| match event {
            watcher::Event::Delete(tb) => {
                let _ = deleted_tx.send(topic_bridge::key_of_meta(tb.meta()));
            }
            watcher::Event::InitDone => {
                bridges_synced_tx.send_replace(true);
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            Default::default(),
        );

    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: events::GatedRecorder::new(Recorder::new(client.clone(), reporter), gate.clone()),
        gate,
        metrics: metrics.clone(),
        backoff: backoff::Backoff::default(),
        settings: settings.clone(),
        aws,
        bindings: binding_store.clone(),
        bridges: bridge_store.clone(),
        relays: relays.clone(),
        status_writers: bridge_status::StatusWriters::default(),
        ledger: Arc::new(ledger::Ledger::new(
            client.clone(),
            &settings.record_namespace,
        )),
        shards: shards.clone(),
        identity: identity(),
        role_checks: Default::default(),
    });

    let (synced_tx, synced) = watch::channel(false);
    {
        let readiness = readiness.clone();
        tokio::spawn(async move {
            if bindings_synced.wait_for(|s| *s).await.is_ok()
                && bridges_synced.wait_for(|s| *s).await.is_ok()
            {
                tracing::info!("watches synced");
                readiness.set_synced();
                synced_tx.send_replace(true);
            }
        });
    }

    // Bridges this replica takes over are reconciled at once.
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded();
    let coordinator = match (&shards, run.bridge) {
        (Some(shards), true) => Some(tokio::spawn(shard::coordinate(
            shards.clone(),
            watch_client.clone(),
            bridge_store.clone(),
            synced.clone(),
            ctx.clone(),
            trigger_tx,
            shutdown.clone(),
        ))),
        _ => None,
    };
    if run.bridge {
        topic_bridge::spawn_sweeper(
            bridge_store.clone(),
            ctx.clone(),
            synced,
            deleted_rx,
            shutdown.clone(),
        );
    }

    let config = ControllerConfig::default().concurrency(settings.concurrency);
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let bindings = Controller::for_stream(binding_stream, binding_store)
        .with_config(config.clone())
        .graceful_shutdown_on(stop(shutdown.clone()))
        .run(
            policy_binding::reconcile_guarded,
            error_policy::<DeserializeGuard<IotPolicyBinding>>(policy_binding::CONTROLLER),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let bridges = Controller::for_stream(bridge_stream, bridge_store)
        .reconcile_on(trigger_rx)
        .with_config(config)
        .graceful_shutdown_on(stop(shutdown.clone()))
        .run(
            topic_bridge::reconcile_guarded,
            error_policy::<DeserializeGuard<TopicBridge>>(topic_bridge::CONTROLLER),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    tracing::info!(
        policy = run.policy,
        bridge = run.bridge,
        "controllers starting"
    );
    tokio::join!(
        async {
            if run.policy {
                bindings.await;
            }
        },
        async {
            if run.bridge {
                bridges.await;
            }
        }
    );
    if let Some(c) = coordinator {
        let _ = c.await;
    }
    relays.stop_all().await;
    // Only now, with every relay of this replica closed, may its bridges pass to another.
    if let (Some(shards), true) = (&shards, run.bridge) {
        shard::release_all(shards, client.clone()).await;
    }
    tracing::info!("controllers stopped");
}
