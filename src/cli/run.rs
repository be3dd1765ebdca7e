//! `iot-operator run`: both controllers, the metrics/health server, graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::watch;

use super::{AwsArgs, CliError, Context, RelayArgs};
use crate::aws::AwsClients;
use crate::controller::leader::{KubeLeaseStore, Leadership, Timing, WriteGate, spawn_elector};
use crate::controller::preflight;
use crate::controller::shard::{self, Shards};
use crate::controller::{self, Settings};
use crate::relay::RelayManager;
use crate::relay::config::ConnectPermit;
use crate::telemetry::Metrics;
use crate::telemetry::http::{self, Readiness};
use crate::tenancy::TenancyConfig;

/// A controller `run` can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ControllerName {
    /// IotPolicyBindings: AWS IoT policy attachments.
    Policy,
    /// TopicBridges: MQTT relays.
    Bridge,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints.
    #[arg(long, env = "IOT_OPERATOR_METRICS_ADDR", default_value_t = super::default_metrics_addr())]
    pub metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "IOT_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Reconciliations in flight per controller.
    #[arg(long, env = "IOT_OPERATOR_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// Seconds between syncs of every IotPolicyBinding with AWS (drift repair, new identities).
    #[arg(long, env = "IOT_OPERATOR_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// Seconds between checks of a pool binding's Cognito roles while its spec is unchanged
    /// (a spec change checks them at once).
    #[arg(long, env = "IOT_OPERATOR_ROLE_CHECK_SECONDS", default_value_t = 3600)]
    pub role_check_seconds: u64,

    /// Elect a leader through a Lease so that only one replica reconciles and runs relays.
    #[arg(long, env = "IOT_OPERATOR_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Spread TopicBridges over every replica instead of running them all on the leader: each
    /// bridge runs on exactly one replica, coordinated through Leases in the Lease's namespace
    /// (one per replica, one per bridge). IotPolicyBindings stay on the leader. Needs
    /// --leader-election.
    #[arg(long, env = "IOT_OPERATOR_SHARD_BRIDGES")]
    pub shard_bridges: bool,
    /// Name of the Lease (and, with --shard-bridges, the prefix of the others).
    #[arg(long, env = "IOT_OPERATOR_LEASE_NAME", default_value = "iot-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own; set from the pod by the chart).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Controllers to run: `policy` (IotPolicyBindings), `bridge` (TopicBridges), or both
    /// (default). A process watches, and needs rights for, only what it runs.
    #[arg(
        long,
        env = "IOT_OPERATOR_CONTROLLERS",
        value_delimiter = ',',
        default_value = "policy,bridge"
    )]
    pub controllers: Vec<ControllerName>,
    /// Namespace of the ConfigMaps that record what each IotPolicyBinding attached (default: the
    /// Lease's namespace, else the client's default namespace).
    #[arg(long, env = "IOT_OPERATOR_RECORD_NAMESPACE")]
    pub record_namespace: Option<String>,
    /// Seconds a Lease stays valid without renewal; a standby takes over after this.
    #[arg(
        long,
        env = "IOT_OPERATOR_LEASE_DURATION_SECONDS",
        default_value_t = 15
    )]
    pub lease_duration_seconds: u64,
    /// YAML file of tenancy rules: which policies, roles and endpoints each namespace may use.
    /// Default: every namespace may only attach policies named `<namespace>-*` and run bridges
    /// with credentials of its own.
    #[arg(long, env = "IOT_OPERATOR_TENANCY_CONFIG")]
    pub tenancy_config: Option<PathBuf>,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub relay: RelayArgs,
}

pub async fn run(args: RunArgs) -> Result<(), CliError> {
    // A broken rules file stops the start: falling back to other rules would be a surprise.
    let tenancy = match &args.tenancy_config {
        Some(path) => TenancyConfig::load(path).map_err(CliError::wrap)?,
        None => TenancyConfig::default(),
    };
    tracing::info!(
        rules = tenancy.rules.len(),
        source = args
            .tenancy_config
            .as_ref()
            .map_or("built-in default".to_owned(), |p| p.display().to_string()),
        "tenancy rules loaded"
    );
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let listener = http::bind(args.metrics_addr)
        .await
        .context(|| format!("--metrics-addr {}", args.metrics_addr))?;
    crate::install_crypto_provider();
    let config = kube::Config::infer().await.context(|| {
        "no Kubernetes configuration (kubeconfig or in-cluster service account)".into()
    })?;
    let url = config.cluster_url.to_string();
    let build = |config: kube::Config| {
        kube::Client::try_from(config)
            .context(|| format!("building the Kubernetes client for {url}"))
    };
    // Watches idle for minutes between events (kube's watcher has its own idle timeout); every
    // other call gets a deadline, so that nothing waits on an API server that accepted a
    // connection and stopped answering.
    let watch_client = build(config.clone())?;
    let client = build(bounded(config))?;
    let record_namespace = args
        .record_namespace
        .clone()
        .or_else(|| args.lease_namespace.clone())
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let controllers = controller::Controllers {
        policy: args.controllers.contains(&ControllerName::Policy),
        bridge: args.controllers.contains(&ControllerName::Bridge),
    };
    if !controllers.policy && !controllers.bridge {
        return Err("--controllers: name at least one of policy, bridge".into());
    }
    preflight::check(
        &client,
        &url,
        args.namespace.as_deref(),
        &record_namespace,
        controllers,
    )
    .await
    .map_err(CliError::wrap)?;
    if args.shard_bridges && !args.leader_election {
        return Err("--shard-bridges needs --leader-election".into());
    }
    let sharded = args.shard_bridges && controllers.bridge;
    let aws = Arc::new(AwsClients::load(args.aws.settings(), Some(metrics.clone())).await);
    let gate = if args.leader_election {
        WriteGate::leased()
    } else {
        WriteGate::always()
    };
    let relays = {
        let gate = gate.clone();
        Arc::new(
            RelayManager::new(Some(metrics.clone()))
                .with_permit(ConnectPermit(Arc::new(move || gate.is_open()))),
        )
    };
    // `stop`: a signal arrived. `release`: everything run under the lease has ended, so the
    // lease may pass (set only after the controllers and every relay have stopped).
    let (stop_tx, stop_rx) = watch::channel(false);
    let (release_tx, release_rx) = watch::channel(false);

    let server = {
        let (metrics, readiness, mut rx) = (metrics.clone(), readiness.clone(), release_rx.clone());
        tokio::spawn(http::serve(listener, metrics, readiness, async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    };
    tokio::spawn(async move {
        super::shutdown_signal().await;
        tracing::info!("shutdown requested: finishing reconciliations and draining relays");
        let _ = stop_tx.send(true);
    });
    tracing::info!(metrics = %args.metrics_addr, namespace = args.namespace.as_deref().unwrap_or("<all>"), "starting");
    let settings = Settings {
        namespace: args.namespace.clone(),
        concurrency: args.concurrency.max(1),
        resync: Duration::from_secs(args.resync_seconds.max(10)),
        role_check: Duration::from_secs(args.role_check_seconds.max(10)),
        relay: args.relay.settings(),
        tenancy: Arc::new(tenancy),
        record_namespace,
        controllers,
    };
    let deps = controller::Deps {
        client: client.clone(),
        watch_client,
        settings,
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        aws,
        relays: relays.clone(),
        gate: gate.clone(),
        shards: None,
    };
    if !args.leader_election {
        controller::run(deps, stop_rx).await;
        let _ = release_tx.send(true);
        let _ = server.await;
        return Ok(());
    }

    let namespace = args
        .lease_namespace
        .clone()
        .ok_or("--leader-election needs --lease-namespace (or POD_NAMESPACE)")?;
    let duration = Duration::from_secs(args.lease_duration_seconds.max(6));
    // Renew every duration/4 (at most 2 s, as client-go: a released lease is taken within
    // this), shut the gate duration/5 before a takeover is possible, give each attempt
    // duration/3.
    let timing = Timing::for_duration(duration);
    let identity = controller::identity();
    if sharded {
        preflight::check_sharding(&client, &url, &namespace)
            .await
            .context(|| "--shard-bridges".into())?;
        run_sharded(
            deps,
            Sharding {
                identity,
                namespace,
                lease_name: args.lease_name.clone(),
                duration,
                timing,
            },
            stop_rx,
            release_tx,
            release_rx,
        )
        .await;
        let _ = server.await;
        return Ok(());
    }
    let store = Arc::new(KubeLeaseStore::new(
        client.clone(),
        &namespace,
        &args.lease_name,
        duration,
    ));
    let (leader, elector) = spawn_elector(store, identity, timing, gate.clone(), release_rx);
    run_when_leading(
        leader,
        stop_rx,
        |controllers_stop| controller::run(deps.clone(), controllers_stop),
        &relays,
        &metrics,
        &readiness,
    )
    .await;
    // Only now, with every relay closed, may another replica connect with the same client ids.
    let _ = release_tx.send(true);
    let _ = elector.await;
    let _ = server.await;
    Ok(())
}

/// Deadlines for request-response calls to the API server: 5 s to connect, 15 s for an answer
/// once a request is sent.
pub fn bounded(mut config: kube::Config) -> kube::Config {
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(API_CALL_DEADLINE);
    config.reset_reader_on_write = true;
    config
}

/// How long a request-response call to the API server may wait for its answer.
pub const API_CALL_DEADLINE: Duration = Duration::from_secs(15);

/// Where and how bridges are spread over replicas.
struct Sharding {
    identity: String,
    namespace: String,
    lease_name: String,
    duration: Duration,
    timing: Timing,
}

/// `--shard-bridges`: the TopicBridge controller runs on every replica, each running the bridges
/// whose Lease it holds while its own member Lease is valid; the IotPolicyBinding controller (if
/// this process runs it) runs on the leader only, as without sharding.
async fn run_sharded(
    deps: controller::Deps,
    s: Sharding,
    stop: watch::Receiver<bool>,
    release_tx: watch::Sender<bool>,
    release_rx: watch::Receiver<bool>,
) {
    let member_gate = WriteGate::leased();
    let shards = Arc::new(Shards::new(
        s.identity.clone(),
        member_gate.clone(),
        s.timing,
        s.lease_name.clone(),
        s.namespace.clone(),
    ));
    let member_store = Arc::new(
        KubeLeaseStore::new(
            deps.client.clone(),
            &s.namespace,
            &shards.member_lease(),
            s.duration,
        )
        .with_labels(shard::labels(&s.lease_name, "member")),
    );
    let (member, member_elector) = spawn_elector(
        member_store,
        s.identity.clone(),
        s.timing,
        member_gate.clone(),
        release_rx.clone(),
    );
    // The bridge side: its own relay manager, whose relays may connect while the membership
    // is valid (and each only while this replica holds its bridge).
    let relays = {
        let gate = member_gate.clone();
        Arc::new(
            RelayManager::new(Some(deps.metrics.clone()))
                .with_permit(ConnectPermit(Arc::new(move || gate.is_open()))),
        )
    };
    let mut bridge_deps = deps.clone();
    bridge_deps.settings.controllers = controller::Controllers {
        policy: false,
        bridge: true,
    };
    bridge_deps.gate = member_gate;
    bridge_deps.relays = relays.clone();
    bridge_deps.shards = Some(shards.clone());
    let membership = {
        let (relays, shards, stop) = (relays.clone(), shards.clone(), stop.clone());
        keep_membership(member, stop, relays, shards, deps.metrics.clone())
    };
    let bridges = controller::run(bridge_deps, stop.clone());

    let policy = async {
        if !deps.settings.controllers.policy {
            return None;
        }
        let mut policy_deps = deps.clone();
        policy_deps.settings.controllers = controller::Controllers {
            policy: true,
            bridge: false,
        };
        let store = Arc::new(KubeLeaseStore::new(
            deps.client.clone(),
            &s.namespace,
            &s.lease_name,
            s.duration,
        ));
        let (leader, elector) = spawn_elector(
            store,
            s.identity.clone(),
            s.timing,
            deps.gate.clone(),
            release_rx.clone(),
        );
        run_when_leading(
            leader,
            stop.clone(),
            |controllers_stop| controller::run(policy_deps.clone(), controllers_stop),
            &deps.relays,
            &deps.metrics,
            &deps.readiness,
        )
        .await;
        Some(elector)
    };
    let ((), (), policy_elector) = tokio::join!(membership, bridges, policy);
    // Every relay has stopped and the bridge Leases are released: the member Lease (and the
    // leader's) may go.
    let _ = release_tx.send(true);
    let _ = member_elector.await;
    if let Some(e) = policy_elector {
        let _ = e.await;
    }
}

/// Relays run while this replica's membership holds: lapsed (its Lease could not be renewed in
/// time) they keep the connections they have, but every held bridge must be confirmed against
/// the API server before any of its relays may connect again; a new term (the member Lease was
/// lost and taken anew) stops them all and starts from nothing. Returns on shutdown, leaving
/// the relays to the controller's drain.
async fn keep_membership(
    mut member: watch::Receiver<Leadership>,
    mut stop: watch::Receiver<bool>,
    relays: Arc<RelayManager>,
    shards: Arc<Shards>,
    metrics: Arc<Metrics>,
) {
    loop {
        shards.clear();
        relays.pause().await;
        metrics.lease_lapsed.set(0);
        let term = tokio::select! {
            r = member.wait_for(Leadership::is_leading) => match r {
                Ok(l) => l.term(),
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        tracing::info!(replica = %shards.me, "member of the bridge replicas");
        relays.resume();
        loop {
            tokio::select! {
                r = member.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = *member.borrow_and_update();
            if now.term() != term {
                break;
            }
            if let Leadership::Lapsed { .. } = now {
                // Another replica may take these bridges while this one cannot see it.
                shards.suspect_all();
            }
            metrics
                .lease_lapsed
                .set(i64::from(matches!(now, Leadership::Lapsed { .. })));
        }
        tracing::warn!(replica = %shards.me, "membership ended: stopping every relay of this replica");
    }
}

/// Runs the controllers while this replica leads. A lapse (the lease could not be renewed in
/// time) changes nothing that runs: relays keep their connections (they make no new one while
/// the gate is shut), and a renewal of the same term carries on. Being deposed (another holder
/// seen, or a new term of this replica's own) stops every relay at once and then the
/// controllers; leading again starts them anew. Returns on shutdown.
pub async fn run_when_leading<F, Fut>(
    mut leader: watch::Receiver<Leadership>,
    mut stop: watch::Receiver<bool>,
    run: F,
    relays: &RelayManager,
    metrics: &Metrics,
    readiness: &Readiness,
) where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        relays.pause().await;
        metrics.leader.set(0);
        metrics.lease_lapsed.set(0);
        metrics.forget_bindings();
        readiness.set_leader(false);
        let term = tokio::select! {
            r = leader.wait_for(Leadership::is_leading) => match r {
                Ok(l) => l.term(),
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        tracing::info!("leading: starting the controllers");
        metrics.leader.set(1);
        readiness.set_leader(true);
        relays.resume();
        let (tx, rx) = watch::channel(false);
        let controllers = run(rx);
        tokio::pin!(controllers);
        // Until the controllers end, the term ends (true) or a stop is asked for.
        let ended = |leader: &mut watch::Receiver<Leadership>| {
            let leader = leader.clone();
            async move {
                let mut leader = leader;
                loop {
                    if leader.changed().await.is_err() {
                        return;
                    }
                    let now = *leader.borrow_and_update();
                    if now.term() != term {
                        return;
                    }
                    metrics
                        .lease_lapsed
                        .set(i64::from(matches!(now, Leadership::Lapsed { .. })));
                }
            }
        };
        let (mut done, deposed) = tokio::select! {
            _ = &mut controllers => (true, false),
            _ = ended(&mut leader) => (false, true),
            _ = stop.wait_for(|s| *s) => (false, false),
        };
        if deposed {
            tracing::warn!("deposed: stopping relays and controllers");
            relays.pause().await;
        }
        let _ = tx.send(true);
        // On shutdown the controllers drain their relays while the term lasts; if it ends
        // meanwhile, the relays are cut at once instead.
        if !done {
            let cut;
            (done, cut) = tokio::select! {
                _ = &mut controllers => (true, false),
                _ = ended(&mut leader), if !deposed => (false, true),
            };
            if cut {
                tracing::warn!("deposed while stopping: closing relays without draining");
                relays.pause().await;
            }
        }
        if !done {
            controllers.await;
        }
        if *stop.borrow() {
            relays.pause().await;
            metrics.leader.set(0);
            metrics.lease_lapsed.set(0);
            return;
        }
    }
}
