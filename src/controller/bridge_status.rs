//! The status of running bridges: what each relay's state means for `TopicBridge.status`
//! (pure), and the writers that apply it, one per running connection, with their Events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::events::publish;
use super::leader::WriteGate;
use super::{Context, MANAGER};
use crate::api::{
    Condition, ConditionStatus, ConnectionState, ConnectionStatus, SessionSubscriptions,
    TopicBridge, TopicBridgeStatus,
};
use crate::relay::{
    ConnectionKey, RelayError, RelayErrorKind, RelayStats, RelayStatus, SideState, Stall,
};

/// How often a writer looks at its relay's counters.
pub(super) const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Running status writers, one per relay.
#[derive(Default)]
pub struct StatusWriters {
    /// Each writer, and how many connections its bridge had when it started.
    tasks: std::sync::Mutex<HashMap<ConnectionKey, (tokio::task::JoinHandle<()>, usize)>>,
}

impl StatusWriters {
    pub(super) fn replace(
        &self,
        key: &ConnectionKey,
        task: tokio::task::JoinHandle<()>,
        connections: usize,
    ) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((old, _)) = tasks.insert(key.clone(), (task, connections)) {
            old.abort();
        }
    }

    /// Whether `key`'s writer runs and was started for a bridge of `connections` connections.
    pub(super) fn current(&self, key: &ConnectionKey, connections: usize) -> bool {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .is_some_and(|(t, n)| *n == connections && !t.is_finished())
    }

    /// Stops the status writers of every connection of bridge `bridge`; returns their keys.
    pub fn remove_bridge(&self, bridge: &str) -> Vec<ConnectionKey> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<ConnectionKey> = tasks.keys().filter(|k| k.of(bridge)).cloned().collect();
        for k in &keys {
            if let Some((t, _)) = tasks.remove(k) {
                t.abort();
            }
        }
        keys
    }

    /// Stops the status writer of `key` (its relay stopped, or runs elsewhere now).
    pub fn remove(&self, key: &ConnectionKey) {
        if let Some(t) = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
        {
            t.0.abort();
        }
    }
}

/// Applies the status, unless this replica may not write (its lease is not valid now).
/// Returns whether it was written.
pub(super) async fn patch_status(
    api: &Api<TopicBridge>,
    gate: &WriteGate,
    name: &str,
    status: &TopicBridgeStatus,
) -> Result<bool, kube::Error> {
    if !gate.is_open() {
        tracing::debug!("not leading: status not written");
        return Ok(false);
    }
    super::apply_status(api, name, MANAGER, status)
        .await
        .map(|_| true)
}

/// Overall state from the two sides.
pub fn connection_state(s: &RelayStatus) -> ConnectionState {
    use SideState::*;
    match (s.source, s.sink) {
        (Connected, Connected) => ConnectionState::Connected,
        (Stopped, _) | (_, Stopped) => ConnectionState::Disconnected,
        (Disrupted, _) | (_, Disrupted) => ConnectionState::ConnectionDisrupted,
        _ => ConnectionState::Connecting,
    }
}

fn side_condition(type_: &str, state: SideState, g: Option<i64>) -> Condition {
    let (status, reason) = match state {
        SideState::Connected => (ConditionStatus::True, "Connected"),
        SideState::Connecting => (ConditionStatus::False, "Connecting"),
        SideState::Disrupted => (ConditionStatus::False, "ConnectionDisrupted"),
        SideState::Stopped => (ConditionStatus::False, "Disconnected"),
    };
    Condition::new(
        type_,
        status,
        reason,
        format!(
            "{} is {}",
            type_.trim_end_matches("Connected").to_lowercase(),
            reason
        ),
        g,
    )
}

/// The other connections of a bridge that runs several, as the first connection's status
/// writer sees them (the entries their writers wrote).
#[derive(Debug, Clone, Copy)]
pub struct OtherConnections<'a> {
    /// How many connections the bridge runs, the first included.
    pub count: usize,
    pub entries: &'a [ConnectionStatus],
}

/// `Ready` of a bridge with several connections, from the first connection's own `Ready`:
/// True only while every connection is connected and moving messages. A connected first
/// connection with another connection down or stalled is `Ready=False`, naming each such
/// connection and its error or stall: reason `Degraded` once one of them was lost (disrupted
/// or stopped), else `Stalled` while one is connected but its destination takes nothing, else
/// `Connecting` while they have not connected yet (not reported, or connecting for the first
/// time: a single connection reads so then too). A first connection that is not ready keeps
/// its own reason.
pub fn ready_across(own: Condition, others: OtherConnections<'_>, g: Option<i64>) -> Condition {
    if others.count <= 1 || own.status != ConditionStatus::True {
        return own;
    }
    let (mut lost, mut stalled) = (false, false);
    let down: Vec<String> = (1..others.count)
        .filter_map(|i| {
            let entry = others
                .entries
                .iter()
                .find(|e| usize::try_from(e.index).ok() == Some(i));
            let Some(e) = entry else {
                return Some(format!("connection {i} has not reported yet"));
            };
            let on = e
                .replica
                .as_deref()
                .map(|r| format!(" on {r}"))
                .unwrap_or_default();
            let state = match (e.connection_state, &e.stalled) {
                (Some(ConnectionState::Connected), None) => return None,
                (Some(ConnectionState::Connected), Some(stall)) => {
                    stalled = true;
                    return Some(format!("connection {i}{on} is Stalled: {stall}"));
                }
                (Some(s), _) => s,
                (None, _) => return Some(format!("connection {i} has not reported yet")),
            };
            lost |= state != ConnectionState::Connecting;
            let state = state.as_str();
            Some(match &e.last_error {
                Some(err) => format!("connection {i}{on} is {state} ({err})"),
                None => format!("connection {i}{on} is {state}"),
            })
        })
        .collect();
    if down.is_empty() {
        return Condition::new(
            "Ready",
            ConditionStatus::True,
            "Connected",
            format!(
                "all {} connections have both brokers connected; messages are relayed",
                others.count
            ),
            g,
        );
    }
    let up = others.count - down.len();
    let message = if stalled {
        // A stalled connection's share of the stream waits for it (the stall says so).
        format!(
            "{up} of {} connections are connected and moving messages; {}",
            others.count,
            down.join("; ")
        )
    } else {
        format!(
            "{up} of {} connections are connected; {}; the connected ones relay the stream",
            others.count,
            down.join("; ")
        )
    };
    let reason = if lost {
        "Degraded"
    } else if stalled {
        "Stalled"
    } else {
        "Connecting"
    };
    Condition::new("Ready", ConditionStatus::False, reason, message, g)
}

/// The status of a running relay. `others`: with several connections, the first connection's
/// writer passes the others' entries, and `Ready` tells all of them ([`ready_across`]).
pub fn relay_status(
    previous: &TopicBridgeStatus,
    s: &RelayStatus,
    stats: &RelayStats,
    others: Option<OtherConnections<'_>>,
    g: Option<i64>,
) -> TopicBridgeStatus {
    use std::sync::atomic::Ordering::Relaxed;
    let mut status = previous.clone();
    let state = connection_state(s);
    let ready = match (state, &s.stalled) {
        (ConnectionState::Connected, Some(stall)) => Condition::new(
            "Ready",
            ConditionStatus::False,
            "Stalled",
            stall.message(),
            g,
        ),
        (ConnectionState::Connected, None) => Condition::new(
            "Ready",
            ConditionStatus::True,
            "Connected",
            "both brokers are connected; messages are relayed",
            g,
        ),
        (other, _) => Condition::new(
            "Ready",
            ConditionStatus::False,
            other.as_str(),
            s.last_error
                .as_ref()
                .map_or_else(|| other.as_str().to_owned(), |e| e.message.clone()),
            g,
        ),
    };
    let ready = match others {
        Some(others) => ready_across(ready, others, g),
        None => ready,
    };
    Condition::upsert(&mut status.conditions, ready);
    Condition::upsert(
        &mut status.conditions,
        side_condition("SourceConnected", s.source, g),
    );
    Condition::upsert(
        &mut status.conditions,
        side_condition("SinkConnected", s.sink, g),
    );
    status.connection_state = Some(state);
    status.messages_relayed = stats.relayed() as i64;
    status.messages_dropped = stats.dropped.load(Relaxed) as i64;
    let last = stats.last_message_ms.load(Relaxed);
    if last > 0 {
        status.last_message_time = jiff::Timestamp::from_millisecond(last)
            .ok()
            .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string());
    }
    status.last_error = s.last_error.as_ref().map(|e| e.message.clone());
    if let Some(d) = &s.last_dropped {
        status.last_dropped = Some(d.message.clone());
    }
    status.observed_generation = g;
    status
}

/// Which connection of a bridge a status writer reports, of how many.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unit {
    pub index: usize,
    pub connections: usize,
}

/// Applies one connection's entry in `status.connections` (`None`: removes it), with a field
/// manager of its own, so that replicas running different connections do not overwrite each
/// other's.
pub(super) async fn patch_connection(
    api: &Api<TopicBridge>,
    gate: &WriteGate,
    name: &str,
    index: usize,
    entry: Option<&ConnectionStatus>,
) -> Result<bool, kube::Error> {
    if !gate.is_open() {
        return Ok(false);
    }
    let status = match entry {
        Some(e) => serde_json::json!({ "connections": [e] }),
        None => serde_json::json!({}),
    };
    super::apply_status(api, name, &format!("{MANAGER}-connection-{index}"), &status)
        .await
        .map(|_| true)
}

/// A status outage shorter than this is not told in an Event (a slow answer, a lease renewed
/// a little late).
const OUTAGE_TOLD_AFTER: Duration = Duration::from_secs(10);

/// Since when a status writer could not write, and how many messages had been relayed then.
struct Outage {
    since: tokio::time::Instant,
    relayed_before: u64,
}

impl Outage {
    fn start(stats: &RelayStats) -> Self {
        Self {
            since: tokio::time::Instant::now(),
            relayed_before: stats.relayed(),
        }
    }
}

/// Tries one status write (`what` names it in the debug log). A write that finds no answer
/// starts the outage, counted from when it was tried, not from when its deadline passed.
/// Returns whether it was written.
async fn attempt(
    write: impl std::future::Future<Output = Result<bool, kube::Error>>,
    stats: &RelayStats,
    outage: &mut Option<Outage>,
    what: &str,
) -> bool {
    let tried = Outage::start(stats);
    match write.await {
        Ok(written) => written,
        Err(e) => {
            outage.get_or_insert(tried);
            tracing::debug!(error = %e, "writing {what} failed");
            false
        }
    }
}

/// Writes one relay's status: on every connection change, counters at most every
/// [`STATUS_INTERVAL`], and an Event on each connection-state transition, drop and refused
/// subscription. Ends when the relay stops or runs elsewhere now.
pub(super) struct StatusWriter {
    api: Api<TopicBridge>,
    tb: Arc<TopicBridge>,
    ctx: Arc<Context>,
    unit: Unit,
    key: ConnectionKey,
    stats: Arc<RelayStats>,
    /// Events of one connection of several say which.
    prefix: String,
    /// The status last written (the first connection), and this connection's entry (the others).
    written: TopicBridgeStatus,
    written_entry: Option<ConnectionStatus>,
    last_state: Option<ConnectionState>,
    /// Drops already told in an Event, and when: at most one such Event per status interval.
    told_drops: u64,
    told_at: Option<tokio::time::Instant>,
    /// A refused subscription leaves the connection up, so no state transition tells it.
    told_refusal: Option<RelayError>,
    /// The stall last told, if it has not ended.
    stalled: Option<Stall>,
    /// When status could last not be written, and the relayed count then.
    outage: Option<Outage>,
    /// What the relay subscribes, recorded in status once it has connected (the first
    /// connection's writer).
    subscribed: SessionSubscriptions,
}

impl StatusWriter {
    pub(super) fn new(
        api: Api<TopicBridge>,
        tb: Arc<TopicBridge>,
        ctx: Arc<Context>,
        key: ConnectionKey,
        unit: Unit,
        stats: Arc<RelayStats>,
        subscribed: SessionSubscriptions,
    ) -> Self {
        let prefix = if unit.connections > 1 {
            format!("connection {}: ", unit.index)
        } else {
            String::new()
        };
        Self {
            written: tb.status.clone().unwrap_or_default(),
            api,
            tb,
            ctx,
            unit,
            key,
            stats,
            prefix,
            written_entry: None,
            last_state: None,
            told_drops: 0,
            told_at: None,
            told_refusal: None,
            stalled: None,
            outage: None,
            subscribed,
        }
    }

    /// Runs until the relay's status channel closes or the relay runs elsewhere.
    #[tracing::instrument(name = "status", skip_all, fields(bridge = %self.key))]
    pub(super) async fn run(mut self, mut rx: watch::Receiver<RelayStatus>) {
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        loop {
            let closed = tokio::select! {
                r = rx.changed() => r.is_err(),
                _ = tick.tick() => false,
            };
            if !self.ctx.runs_bridge(&self.key) {
                // Handed over (or lost to another replica): the next replica writes from now on.
                break;
            }
            let snapshot = rx.borrow_and_update().clone();
            // While this replica may not write (its lease lapsed: the API server did not
            // answer), the relay runs on; the outage is timed and told once status is written
            // again.
            let may_write = self.ctx.owns_bridge(&self.key);
            if !may_write {
                self.outage
                    .get_or_insert_with(|| Outage::start(&self.stats));
            }
            // The first connection's writer tells the others' state in `Ready`, as their
            // writers (on this replica or another) last wrote it.
            let entries = (self.unit.index == 0 && self.unit.connections > 1)
                .then(|| self.ctx.bridge_connections(&self.tb))
                .flatten();
            let others = entries.as_deref().map(|entries| OtherConnections {
                count: self.unit.connections,
                entries,
            });
            let mut next = relay_status(
                &self.written,
                &snapshot,
                &self.stats,
                others,
                self.tb.metadata.generation,
            );
            next.replica = Some(self.ctx.identity.clone());
            // Connected, the relay has made its subscriptions (and removed those the record
            // held that it does not make): they are what its sessions hold from now on.
            if next.connection_state == Some(ConnectionState::Connected) {
                next.subscriptions = Some(self.subscribed.clone());
            }
            if closed {
                next.connection_state = Some(ConnectionState::Disconnected);
            }
            let state = next.connection_state;
            // A stall of a connected relay (a stopped one is not stalled).
            let stalled = snapshot
                .stalled
                .filter(|_| state == Some(ConnectionState::Connected))
                .map(|s| s.message());
            let wrote = may_write && self.write(next, stalled).await;
            if wrote {
                self.tell_outage_over().await;
            }
            self.tell_drops(&snapshot).await;
            self.tell_refusal(&snapshot).await;
            self.tell_transition(state, &snapshot).await;
            self.tell_stall(&snapshot).await;
            if closed {
                break;
            }
        }
    }

    /// Writes what is due: the whole status from the first connection, this connection's
    /// entry (with `stalled`, its stall's message) from the others. Returns whether
    /// something was written.
    async fn write(&mut self, mut next: TopicBridgeStatus, stalled: Option<String>) -> bool {
        let entry = ConnectionStatus {
            index: self.unit.index as i32,
            replica: next.replica.clone(),
            connection_state: next.connection_state,
            messages_relayed: next.messages_relayed,
            last_error: next.last_error.clone(),
            stalled,
        };
        let name = self.tb.name_any();
        if self.unit.index == 0 {
            // Only this connection's own entry: the others' belong to their writers.
            next.connections = if self.unit.connections > 1 {
                vec![entry]
            } else {
                Vec::new()
            };
            // After an outage, one write proves the API server answers again.
            let due = next != self.written
                || self.written.observed_generation != self.tb.metadata.generation
                || self.outage.is_some();
            if !due {
                return false;
            }
            let write = patch_status(&self.api, &self.ctx.gate, &name, &next);
            let wrote = attempt(write, &self.stats, &mut self.outage, "bridge status").await;
            if wrote {
                self.written = next;
            }
            wrote
        } else {
            if self.written_entry.as_ref() == Some(&entry) && self.outage.is_none() {
                return false;
            }
            let index = self.unit.index;
            let write = patch_connection(&self.api, &self.ctx.gate, &name, index, Some(&entry));
            let wrote = attempt(write, &self.stats, &mut self.outage, "connection status").await;
            if wrote {
                self.written_entry = Some(entry);
            }
            wrote
        }
    }

    /// After a write: an outage long enough to matter is told, with what was relayed meanwhile.
    async fn tell_outage_over(&mut self) {
        let Some(o) = self.outage.take() else {
            return;
        };
        let lasted = o.since.elapsed();
        if lasted < OUTAGE_TOLD_AFTER {
            return;
        }
        let relayed = self.stats.relayed().saturating_sub(o.relayed_before);
        tracing::warn!(lasted = ?lasted, relayed, "status written again after the control plane was unreachable");
        let note = format!(
            "{}status could not be written for {} s (the API server did not answer, or this \
             replica's lease could not be renewed); the relay kept running on its last spec and \
             relayed {relayed} messages meanwhile; status is current again",
            self.prefix,
            lasted.as_secs()
        );
        self.event(EventType::Warning, "ControlPlaneUnreachable", "Relay", note)
            .await;
    }

    /// New drops: at most one Event per status interval.
    async fn tell_drops(&mut self, snapshot: &RelayStatus) {
        let Some(d) = &snapshot.last_dropped else {
            return;
        };
        if d.count <= self.told_drops || self.told_at.is_some_and(|t| t.elapsed() < STATUS_INTERVAL)
        {
            return;
        }
        let note = format!("{}{}", self.prefix, d.message);
        self.event(EventType::Warning, "MessageDropped", "Drop", note)
            .await;
        self.told_drops = d.count;
        self.told_at = Some(tokio::time::Instant::now());
    }

    /// A refused subscription, once per refusal.
    async fn tell_refusal(&mut self, snapshot: &RelayStatus) {
        let Some(e) = &snapshot.last_error else {
            return;
        };
        if e.kind != RelayErrorKind::SubscriptionRefused || self.told_refusal.as_ref() == Some(e) {
            return;
        }
        let note = format!("{}{e}", self.prefix);
        self.event(EventType::Warning, "SubscriptionRefused", "Subscribe", note)
            .await;
        self.told_refusal = Some(e.clone());
    }

    /// A stall as it starts (Warning `Stalled`), and its end while both sides are still up
    /// (`Resumed`; a side that went down is told by the state's own Event).
    async fn tell_stall(&mut self, snapshot: &RelayStatus) {
        match (&snapshot.stalled, &self.stalled) {
            (Some(stall), None) => {
                let note = format!("{}{}", self.prefix, stall.message());
                self.event(EventType::Warning, "Stalled", "Relay", note)
                    .await;
            }
            (None, Some(stall)) if connection_state(snapshot) == ConnectionState::Connected => {
                let note = format!(
                    "{}the {} takes messages again",
                    self.prefix,
                    stall.side().as_str()
                );
                self.event(EventType::Normal, "Resumed", "Relay", note)
                    .await;
            }
            _ => {}
        }
        self.stalled = snapshot.stalled;
    }

    /// A change of connection state (not the first one seen).
    async fn tell_transition(&mut self, state: Option<ConnectionState>, snapshot: &RelayStatus) {
        if state == self.last_state {
            return;
        }
        if let Some(s) = state
            && self.last_state.is_some()
        {
            let (type_, note) = match s {
                ConnectionState::Connected => {
                    (EventType::Normal, "both brokers connected".to_owned())
                }
                other => (
                    EventType::Warning,
                    snapshot
                        .last_error
                        .as_ref()
                        .map_or_else(|| other.as_str().to_owned(), |e| e.message.clone()),
                ),
            };
            let note = format!("{}{note}", self.prefix);
            self.event(type_, s.as_str(), "Relay", note).await;
        }
        self.last_state = state;
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        publish(
            &self.ctx.recorder,
            self.tb.as_ref(),
            type_,
            reason,
            action,
            note,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::Direction;

    fn connected() -> RelayStatus {
        RelayStatus {
            source: SideState::Connected,
            sink: SideState::Connected,
            ..RelayStatus::starting()
        }
    }

    fn ready(status: &TopicBridgeStatus) -> (ConditionStatus, String, String) {
        let c = Condition::find(&status.conditions, "Ready").expect("Ready");
        (c.status, c.reason.clone(), c.message.clone())
    }

    #[test]
    fn a_stalled_relay_is_ready_false_reason_stalled_naming_the_side_and_since_when() {
        let stats = RelayStats::default();
        let previous = TopicBridgeStatus::default();
        let status = relay_status(&previous, &connected(), &stats, None, Some(1));
        assert_eq!(ready(&status).0, ConditionStatus::True);

        let stalled = RelayStatus {
            // 2026-12-04T10:00:00Z
            stalled: Some(Stall {
                direction: Direction::In,
                since_ms: 1_796_378_400_000,
            }),
            ..connected()
        };
        let status = relay_status(&previous, &stalled, &stats, None, Some(1));
        let (s, reason, message) = ready(&status);
        assert_eq!((s, reason.as_str()), (ConditionStatus::False, "Stalled"));
        assert_eq!(
            message,
            "the sink is connected but has taken none of the messages waiting for it (direction \
             in) since 2026-12-04T10:00:00Z; they are kept and sent on once it takes them"
        );
        // Still connected: the connection state says so.
        assert_eq!(status.connection_state, Some(ConnectionState::Connected));
        // The same stall later writes the same status (no write per interval).
        assert_eq!(
            relay_status(&status, &stalled, &stats, None, Some(1)),
            status
        );

        // It ends: Ready again.
        let status = relay_status(&status, &connected(), &stats, None, Some(1));
        assert_eq!(ready(&status).0, ConditionStatus::True);
    }

    #[test]
    fn a_side_that_is_down_is_told_before_a_stall() {
        let down = RelayStatus {
            sink: SideState::Disrupted,
            stalled: Some(Stall {
                direction: Direction::Out,
                since_ms: 1,
            }),
            ..connected()
        };
        let status = relay_status(
            &TopicBridgeStatus::default(),
            &down,
            &RelayStats::default(),
            None,
            None,
        );
        assert_eq!(ready(&status).1, "ConnectionDisrupted");
    }

    fn entry(index: i32, state: Option<ConnectionState>, error: Option<&str>) -> ConnectionStatus {
        ConnectionStatus {
            index,
            replica: Some("op-1".into()),
            connection_state: state,
            messages_relayed: 0,
            last_error: error.map(str::to_owned),
            stalled: None,
        }
    }

    #[test]
    fn ready_with_several_connections_needs_every_one_connected() {
        let stats = RelayStats::default();
        let ours = TopicBridgeStatus::default();
        let all = [
            entry(0, Some(ConnectionState::Connected), None),
            entry(1, Some(ConnectionState::Connected), None),
            entry(2, Some(ConnectionState::Connected), None),
        ];
        let others = |entries| Some(OtherConnections { count: 3, entries });
        let status = relay_status(&ours, &connected(), &stats, others(&all), Some(1));
        assert_eq!(
            ready(&status),
            (
                ConditionStatus::True,
                "Connected".to_owned(),
                "all 3 connections have both brokers connected; messages are relayed".to_owned()
            )
        );

        // Not connected yet: one refused at its first connect, one not reported: Connecting
        // (Progressing for Argo CD, as a single connection connecting), naming both.
        let starting = [
            entry(0, Some(ConnectionState::Connected), None),
            entry(
                1,
                Some(ConnectionState::Connecting),
                Some("source: not authorized"),
            ),
        ];
        let connecting = relay_status(&status, &connected(), &stats, others(&starting), Some(1));
        assert_eq!(
            ready(&connecting),
            (
                ConditionStatus::False,
                "Connecting".to_owned(),
                "1 of 3 connections are connected; connection 1 on op-1 is Connecting (source: \
                 not authorized); connection 2 has not reported yet; the connected ones relay the \
                 stream"
                    .to_owned()
            )
        );

        // One lost, one not reported yet: Degraded, naming both.
        let some = [
            entry(0, Some(ConnectionState::Connected), None),
            entry(
                1,
                Some(ConnectionState::ConnectionDisrupted),
                Some("source: not authorized"),
            ),
        ];
        let degraded = relay_status(&status, &connected(), &stats, others(&some), Some(1));
        assert_eq!(
            ready(&degraded),
            (
                ConditionStatus::False,
                "Degraded".to_owned(),
                "1 of 3 connections are connected; connection 1 on op-1 is ConnectionDisrupted \
                 (source: not authorized); connection 2 has not reported yet; the connected ones \
                 relay the stream"
                    .to_owned()
            )
        );
        // The same entries again write the same status (no write per interval).
        assert_eq!(
            relay_status(&degraded, &connected(), &stats, others(&some), Some(1)),
            degraded
        );
        // An entry of a connection the bridge no longer runs does not count.
        let fewer = Some(OtherConnections {
            count: 2,
            entries: &all[..2],
        });
        let status = relay_status(&degraded, &connected(), &stats, fewer, Some(1));
        assert_eq!(ready(&status).0, ConditionStatus::True);

        // The first connection down tells its own reason, whatever the others do.
        let down = RelayStatus {
            source: SideState::Connecting,
            ..connected()
        };
        let status = relay_status(&ours, &down, &stats, others(&all), Some(1));
        assert_eq!(ready(&status).1, "Connecting");
        // One connection: its own Ready, entries or not.
        let one = Some(OtherConnections {
            count: 1,
            entries: &some,
        });
        let status = relay_status(&ours, &connected(), &stats, one, Some(1));
        assert_eq!(
            ready(&status).2,
            "both brokers are connected; messages are relayed"
        );
    }

    #[test]
    fn a_stall_of_another_connection_makes_the_bridge_not_ready_naming_it() {
        let stats = RelayStats::default();
        let ours = TopicBridgeStatus::default();
        let stall = Stall {
            direction: Direction::In,
            since_ms: 1_000,
        }
        .message();
        let stalled = ConnectionStatus {
            stalled: Some(stall.clone()),
            ..entry(1, Some(ConnectionState::Connected), None)
        };
        let entries = [entry(0, Some(ConnectionState::Connected), None), stalled];
        let others = |entries| Some(OtherConnections { count: 2, entries });
        let status = relay_status(&ours, &connected(), &stats, others(&entries), Some(1));
        assert_eq!(
            ready(&status),
            (
                ConditionStatus::False,
                "Stalled".to_owned(),
                format!(
                    "1 of 2 connections are connected and moving messages; connection 1 on op-1 \
                     is Stalled: {stall}"
                )
            )
        );
        assert!(
            stall.starts_with("the sink is connected but has taken none"),
            "{stall}"
        );
        // A lost connection outweighs a stalled one.
        let three = [
            entries[1].clone(),
            entry(2, Some(ConnectionState::ConnectionDisrupted), None),
        ];
        let status = relay_status(
            &ours,
            &connected(),
            &stats,
            Some(OtherConnections {
                count: 3,
                entries: &three,
            }),
            Some(1),
        );
        let (s, reason, message) = ready(&status);
        assert_eq!((s, reason.as_str()), (ConditionStatus::False, "Degraded"));
        assert!(
            message
                .starts_with("1 of 3 connections are connected and moving messages; connection 1")
                && message.ends_with("connection 2 on op-1 is ConnectionDisrupted"),
            "{message}"
        );
        // Once it moves again, Ready.
        let moving = [entry(1, Some(ConnectionState::Connected), None)];
        let status = relay_status(&status, &connected(), &stats, others(&moving), Some(1));
        assert_eq!(ready(&status).0, ConditionStatus::True);
    }
}
