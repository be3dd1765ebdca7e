//! TopicBridges spread over every replica, coordinated only through Leases in the operator's
//! namespace (`--shard-bridges`).
//!
//! - **Members.** Each replica holds a member Lease of its own (`<lease>-m-<pod>`), renewed like
//!   the leader's. A replica whose renewal is late by `duration - margin` has lapsed, as a leader
//!   does ([`super::leader`]): its relays keep the connections they have, but none connects
//!   again until the membership is renewed *and* each held bridge's Lease has been read back from
//!   the API server still naming this replica. A bridge whose Lease names another replica is
//!   stopped at once.
//! - **Bridges.** One Lease per TopicBridge (`<lease>-b-<hash>`, annotated with the bridge)
//!   names the replica that runs it. It is written only when a bridge changes hands; its
//!   holder's liveness is its member Lease, so the cost of renewals does not grow with the number
//!   of bridges.
//! - **Assignment.** Every replica computes the same assignment from the bridges it watches and
//!   the live members it sees ([`plan::assign`]); views that differ for a moment cannot make two
//!   replicas run one bridge, because a replica starts a relay only after it has written the
//!   bridge's Lease over the version it saw (optimistic concurrency through the API server).
//! - **Hand-over.** A replica that should give a bridge up stops its relay (draining it) and then
//!   releases the Lease; the new owner takes it on its next round. A dead replica's bridges are
//!   taken once its member Lease has been seen unchanged for a whole lease duration, by which
//!   time the dead replica (if it was only frozen or cut off) has stopped its relays.
//!
//! IotPolicyBindings stay on one leader: their syncs share one AWS account's API quotas, which one
//! rate limiter in one process paces, and their records would otherwise need a lock of their own.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Context;
use super::leader::{Timing, WriteGate};
use super::topic_bridge::live_connections;
use crate::api::TopicBridge;
use crate::relay::ConnectionKey;
use crate::telemetry::metrics::HandoverLabels;
use plan::{BridgeLease, Liveness, Step, View};

/// Label on every Lease of the scheme: the lease-name prefix they belong to.
pub const GROUP_LABEL: &str = "iot.operator.dev/lease-group";
/// Label saying what a Lease is: `member` or `bridge`.
pub const ROLE_LABEL: &str = "iot.operator.dev/lease-role";
/// Annotation on a bridge Lease: the TopicBridge's `namespace/name`.
pub const BRIDGE_ANNOTATION: &str = "iot.operator.dev/bridge";

/// A member Lease unchanged this many lease durations is deleted (its replica is long gone).
const MEMBER_GC_DURATIONS: u32 = 10;

/// This replica's share of the bridges, shared by the coordinator, the reconciler and the
/// relays' connect permits.
pub struct Shards {
    /// This replica's identity (its pod name).
    pub me: String,
    /// Open while this replica's membership is valid.
    pub gate: WriteGate,
    pub timing: Timing,
    /// Prefix of every Lease name of the scheme.
    pub group: String,
    /// Namespace of the Leases (the operator's own).
    pub namespace: String,
    held: Mutex<BTreeMap<String, Claim>>,
}

/// A bridge Lease this replica wrote itself into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The Lease's version after this replica's write.
    pub written: String,
    /// The version it wrote over (empty when it created the Lease). A cached Lease still at
    /// this version is one the watch has not caught up with, not one another replica took.
    pub over: String,
    /// Set when the membership lapsed: another replica may have taken the bridge meanwhile, so
    /// its relays may not connect until the Lease is read back naming this replica.
    pub suspect: bool,
}

impl Shards {
    pub fn new(
        me: String,
        gate: WriteGate,
        timing: Timing,
        group: String,
        namespace: String,
    ) -> Self {
        Self {
            me,
            gate,
            timing,
            group,
            namespace,
            held: Mutex::default(),
        }
    }

    /// Whether this replica may connect the relay `key` now.
    pub fn owns(&self, key: &ConnectionKey) -> bool {
        self.gate.is_open()
            && self
                .lock()
                .get(key.to_string().as_str())
                .is_some_and(|c| !c.suspect)
    }

    /// Whether this replica holds the relay `key` (it may keep running).
    pub fn holds(&self, key: &ConnectionKey) -> bool {
        self.lock().contains_key(key.to_string().as_str())
    }

    /// Marks every held bridge as needing confirmation (the membership lapsed).
    pub fn suspect_all(&self) {
        for c in self.lock().values_mut() {
            c.suspect = true;
        }
    }

    fn suspects(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, c)| c.suspect)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The bridges this replica holds.
    pub fn held(&self) -> BTreeSet<String> {
        self.lock().keys().cloned().collect()
    }

    fn claim(&self, key: &str) -> Option<Claim> {
        self.lock().get(key).cloned()
    }

    /// Forgets every bridge (the membership ended: the relays are stopped by the caller).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Claim>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Lease of bridge `key`.
    pub fn bridge_lease(&self, key: &str) -> String {
        format!("{}-b-{:016x}", self.group, plan::stable_hash(&[key]))
    }

    /// This replica's member Lease.
    pub fn member_lease(&self) -> String {
        member_lease(&self.group, &self.me)
    }
}

/// The member Lease of `me`: its name when that fits a Lease name, else a hash of it.
pub fn member_lease(group: &str, me: &str) -> String {
    let plain = format!("{group}-m-{me}");
    let fits = plain.len() <= 253
        && plain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if fits {
        plain
    } else {
        format!("{group}-m-{:016x}", plan::stable_hash(&[me]))
    }
}

/// Labels of the scheme's Leases.
pub fn labels(group: &str, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GROUP_LABEL.to_owned(), group.to_owned()),
        (ROLE_LABEL.to_owned(), role.to_owned()),
    ])
}

/// How often a round runs. Rounds read the watched Leases (no API call unless they act), so
/// they are cheap; their interval bounds how late a member's renewal or death is noticed.
const ROUND_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs rounds until `shutdown`: watches the scheme's Leases, sees members and bridge Leases,
/// plans, and acts. Bridges it takes are handed to the controller through `trigger`.
pub async fn coordinate(
    shards: Arc<Shards>,
    watch_client: Client,
    store: Store<DeserializeGuard<TopicBridge>>,
    synced: watch::Receiver<bool>,
    ctx: Arc<Context>,
    trigger: UnboundedSender<ObjectRef<DeserializeGuard<TopicBridge>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &shards.namespace);
    let (leases, writer) = reflector::store();
    let mut leases_synced = false;
    let selector = format!("{GROUP_LABEL}={}", shards.group);
    let watch_api: Api<Lease> = Api::namespaced(watch_client, &shards.namespace);
    let events = watcher(watch_api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .reflect(writer);
    tokio::pin!(events);
    let mut liveness = Liveness::default();
    let mut tick = tokio::time::interval(ROUND_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            event = events.next() => {
                match event {
                    Some(Ok(watcher::Event::InitDone)) => leases_synced = true,
                    Some(Err(e)) => tracing::warn!(error = %e, "watching the Leases failed"),
                    _ => {}
                }
                continue;
            }
            _ = shutdown.wait_for(|s| *s) => break,
        }
        if !leases_synced {
            continue;
        }
        let round = Round {
            shards: &shards,
            api: &api,
            ctx: &ctx,
            trigger: &trigger,
        };
        if shards.gate.is_open() && !shards.suspects().is_empty() {
            round.confirm(&selector).await;
        }
        round
            .run(&mut liveness, &leases.state(), &store, &synced)
            .await;
        ctx.metrics.bridges_held.set(shards.held().len() as i64);
    }
}

/// How a relay this replica gives up ends.
#[derive(Clone, Copy)]
enum GiveUp {
    /// At once: another replica may run it already.
    Abort,
    /// After draining: it is handed over.
    Drain,
    /// Gone for good: leave the shared subscriptions, then drain.
    Retire,
}

struct Round<'a> {
    shards: &'a Shards,
    api: &'a Api<Lease>,
    ctx: &'a Context,
    trigger: &'a UnboundedSender<ObjectRef<DeserializeGuard<TopicBridge>>>,
}

impl Round<'_> {
    async fn run(
        &self,
        liveness: &mut Liveness,
        list: &[Arc<Lease>],
        store: &Store<DeserializeGuard<TopicBridge>>,
        synced: &watch::Receiver<bool>,
    ) {
        let shards = self.shards;
        let now = Instant::now();
        let member = shards.gate.is_open();
        let mut members = BTreeSet::new();
        let mut alive = BTreeSet::new();
        let wall = jiff::Timestamp::now();
        let mut names = BTreeSet::new();
        let mut stale_members = Vec::new();
        let mut by_name: BTreeMap<String, Lease> = BTreeMap::new();
        for l in list {
            let name = l.metadata.name.clone().unwrap_or_default();
            names.insert(name.clone());
            by_name.insert(name.clone(), l.as_ref().clone());
            if role(l) != "member" {
                continue;
            }
            let holder = holder(l);
            let version = l.metadata.resource_version.clone().unwrap_or_default();
            let age = l
                .spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .and_then(|t| wall.duration_since(t.0).try_into().ok());
            let seen = liveness.observe(&name, &version, &holder, now, shards.timing.duration, age);
            if seen.likely {
                members.insert(holder.clone());
            }
            if seen.alive {
                alive.insert(holder);
            } else if holder != shards.me
                && seen.unchanged >= shards.timing.duration * MEMBER_GC_DURATIONS
            {
                stale_members.push(name);
            }
        }
        liveness.retain(&names);
        // This replica counts as a member exactly while its own gate is open, whatever the list
        // (read a moment ago) says.
        members.remove(&shards.me);
        alive.remove(&shards.me);
        if member {
            members.insert(shards.me.clone());
            alive.insert(shards.me.clone());
        }
        let mut leases = BTreeMap::new();
        for l in list {
            let Some(bridge) = l
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(BRIDGE_ANNOTATION))
            else {
                continue;
            };
            if role(l) != "bridge" {
                continue;
            }
            let mut holder = holder(l);
            // The watch may lag this replica's own last write: a Lease still at the version
            // that write replaced is this replica's.
            let version = l.metadata.resource_version.clone().unwrap_or_default();
            if shards.claim(bridge).is_some_and(|c| c.over == version) {
                holder = shards.me.clone();
            }
            leases.insert(
                bridge.clone(),
                BridgeLease {
                    name: l.metadata.name.clone().unwrap_or_default(),
                    bridge: bridge.clone(),
                    holder_alive: alive.contains(&holder),
                    holder,
                },
            );
        }
        // Each connection of a bridge is placed on its own.
        let bridges = (*synced.borrow()).then(|| {
            live_connections(store)
                .iter()
                .map(ConnectionKey::to_string)
                .collect::<BTreeSet<_>>()
        });
        if let Some(b) = &bridges {
            self.ctx.metrics.bridge_connections.set(b.len() as i64);
        }
        let view = View {
            me: &shards.me,
            member,
            members,
            bridges,
            leases,
            held: shards.held(),
        };
        for step in plan::plan(&view) {
            self.act(step, &view, &by_name).await;
        }
        for name in stale_members {
            if let Some(l) = by_name.get(&name) {
                self.delete(l).await;
            }
        }
    }

    /// Takes one step; its log lines name the bridge connection (`bridge`, from this span).
    #[tracing::instrument(name = "shard", skip_all, fields(bridge = step.bridge()))]
    async fn act(&self, step: Step, view: &View<'_>, by_name: &BTreeMap<String, Lease>) {
        let shards = self.shards;
        let lease_of = |bridge: &str| {
            view.leases
                .get(bridge)
                .and_then(|l| by_name.get(&l.name))
                .cloned()
        };
        match step {
            Step::Lost { bridge } => {
                tracing::warn!("another replica holds this bridge's Lease: stopping its relay now");
                self.give_up(&bridge, GiveUp::Abort).await;
                self.count("lost");
            }
            Step::Release { bridge } => {
                tracing::info!(
                    "another replica should run this bridge: draining, then handing it over"
                );
                self.give_up(&bridge, GiveUp::Drain).await;
                if let Some(l) = lease_of(&bridge) {
                    match self.write(&l, "").await {
                        Ok(_) => self.count("released"),
                        Err(e) => {
                            tracing::warn!(error = %e, "releasing the bridge's Lease failed")
                        }
                    }
                }
            }
            Step::Retire { bridge, lease } => {
                self.give_up(&bridge, GiveUp::Retire).await;
                if let Some(l) = by_name.get(&lease) {
                    self.delete(l).await;
                }
                self.count("retired");
            }
            Step::Collect { lease } => {
                if let Some(l) = by_name.get(&lease) {
                    self.delete(l).await;
                }
            }
            Step::Acquire { bridge } => {
                let current = lease_of(&bridge);
                let over = current
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone())
                    .unwrap_or_default();
                let result = match &current {
                    Some(l) => self.write(l, &shards.me).await,
                    None => self.create(&bridge).await,
                };
                match result {
                    // Checked again: the membership may have lapsed while the write was out.
                    Ok(written) if shards.gate.is_open() => {
                        let claim = Claim {
                            written: written.metadata.resource_version.unwrap_or_default(),
                            over,
                            suspect: false,
                        };
                        shards.lock().insert(bridge.clone(), claim);
                        self.count("acquired");
                        tracing::info!(replica = %shards.me, "took the bridge");
                        if let Some((ns, name)) =
                            ConnectionKey::parse(&bridge).bridge().split_once('/')
                        {
                            let _ = self.trigger.unbounded_send(ObjectRef::new(name).within(ns));
                        }
                    }
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                        tracing::debug!("the bridge's Lease changed meanwhile");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "taking the bridge's Lease failed")
                    }
                }
            }
        }
    }

    /// Gives connection `bridge` up on this replica: forgets its claim, stops its status
    /// writer, and ends its relay as `how` says.
    async fn give_up(&self, bridge: &str, how: GiveUp) {
        self.shards.lock().remove(bridge);
        let key = ConnectionKey::parse(bridge);
        self.ctx.status_writers.remove(&key);
        match how {
            GiveUp::Abort => {
                self.ctx.relays.abort(&key).await;
            }
            GiveUp::Drain => {
                self.ctx.relays.stop(&key).await;
            }
            GiveUp::Retire => {
                self.ctx.relays.retire_where(|k| *k == key).await;
            }
        }
    }

    /// After a lapse: reads the bridge Leases from the API server (not the watch, which may lag)
    /// and keeps the suspect bridges whose Lease still names this replica; the others were taken
    /// meanwhile and stop at once.
    async fn confirm(&self, selector: &str) {
        let shards = self.shards;
        let list = match self
            .api
            .list(&kube::api::ListParams::default().labels(selector))
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "reading the bridge Leases after a lapse failed; retrying");
                return;
            }
        };
        let holders: BTreeMap<String, (String, String)> = list
            .items
            .iter()
            .filter(|l| role(l) == "bridge")
            .filter_map(|l| {
                let bridge = l.metadata.annotations.as_ref()?.get(BRIDGE_ANNOTATION)?;
                let version = l.metadata.resource_version.clone().unwrap_or_default();
                Some((bridge.clone(), (holder(l), version)))
            })
            .collect();
        for bridge in shards.suspects() {
            match holders.get(&bridge) {
                Some((holder, version)) if *holder == shards.me => {
                    if let Some(c) = shards.lock().get_mut(&bridge) {
                        c.suspect = false;
                        c.written = version.clone();
                    }
                    tracing::info!(bridge = %bridge, "still this replica's after the lapse");
                }
                other => {
                    tracing::warn!(
                        bridge = %bridge,
                        holder = other.map_or("<no Lease>", |(h, _)| h.as_str()),
                        "taken by another replica during the lapse: stopping its relay now"
                    );
                    self.give_up(&bridge, GiveUp::Abort).await;
                    self.count("lost");
                }
            }
        }
    }

    fn count(&self, reason: &'static str) {
        self.ctx
            .metrics
            .bridge_handovers
            .get_or_create(&HandoverLabels { reason })
            .inc();
    }

    async fn create(&self, bridge: &str) -> Result<Lease, kube::Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.shards.bridge_lease(bridge)),
                labels: Some(labels(&self.shards.group, "bridge")),
                annotations: Some(BTreeMap::from([(
                    BRIDGE_ANNOTATION.to_owned(),
                    bridge.to_owned(),
                )])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.shards.me.clone()),
                lease_duration_seconds: Some(duration_seconds(self.shards.timing)),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        self.api.create(&PostParams::default(), &lease).await
    }

    /// Writes `holder` (empty: released) over the version of `current` this round saw.
    async fn write(&self, current: &Lease, holder: &str) -> Result<Lease, kube::Error> {
        let mut next = current.clone();
        let spec = next.spec.get_or_insert_with(Default::default);
        let now = MicroTime(jiff::Timestamp::now());
        if spec.holder_identity.as_deref().unwrap_or_default() != holder && !holder.is_empty() {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = (!holder.is_empty()).then(|| holder.to_owned());
        spec.renew_time = Some(now);
        let name = current.metadata.name.clone().unwrap_or_default();
        self.api.replace(&name, &PostParams::default(), &next).await
    }

    /// Deletes a Lease if it is still the version this round saw.
    async fn delete(&self, l: &Lease) {
        let name = l.metadata.name.clone().unwrap_or_default();
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: l.metadata.resource_version.clone(),
                uid: l.metadata.uid.clone(),
            }),
            ..Default::default()
        };
        match self.api.delete(&name, &params).await {
            Ok(_) => tracing::info!(lease = %name, "deleted a Lease no longer used"),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
            Err(e) => tracing::warn!(lease = %name, error = %e, "deleting a Lease failed"),
        }
    }
}

fn role(l: &Lease) -> &str {
    l.metadata
        .labels
        .as_ref()
        .and_then(|m| m.get(ROLE_LABEL))
        .map_or("", String::as_str)
}

fn holder(l: &Lease) -> String {
    l.spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

fn duration_seconds(t: Timing) -> i32 {
    i32::try_from(t.duration.as_secs()).unwrap_or(i32::MAX)
}

/// On shutdown, after every relay has stopped: releases the bridge Leases this replica holds,
/// so that the others take them on their next round instead of after a lease duration.
pub async fn release_all(shards: &Shards, client: Client) {
    let api: Api<Lease> = Api::namespaced(client, &shards.namespace);
    let held = shards.held();
    shards.clear();
    for bridge in held {
        let name = shards.bridge_lease(&bridge);
        let Ok(Some(mut l)) = api.get_opt(&name).await else {
            continue;
        };
        let Some(spec) = l.spec.as_mut() else {
            continue;
        };
        if spec.holder_identity.as_deref() != Some(shards.me.as_str()) {
            continue;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match api.replace(&name, &PostParams::default(), &l).await {
            Ok(_) => tracing::info!(bridge = %bridge, "released the bridge's Lease"),
            Err(e) => {
                tracing::warn!(bridge = %bridge, error = %e, "releasing the bridge's Lease failed")
            }
        }
    }
}
