//! Who hears of a connection: the events a side's connection sends its publisher, and the
//! tenants of a connection that relays share ([`Tenants`]): on a sink, each hears of its own
//! publishes only; on a source, each routes what it reads with its own routes. Both the
//! connection and the shared-connection pool use these; neither imports the other's internals.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::sync::{Notify, mpsc};

use super::Context;
use super::backlog::Backlog;
use super::config::RouteConfig;
use super::mqtt::{Client, Message, Tenant};
use super::routing::{Origins, Router, Take, subscriptions};
use super::status::{RelayStats, Side, SideState};
use crate::topic::{FilterTree, TopicFilter};

/// How long a relay that left a shared source connection keeps holding back the messages its
/// routes match, unless another relay joins first (its successor, after a change of
/// configuration): then the connection reconnects, and the broker delivers them again.
pub(super) const REJOIN_GRACE: Duration = Duration::from_secs(1);

/// Connection events, from a side's connection to the same side's publisher.
pub(super) enum ConnEvent {
    Connected {
        client: Client,
    },
    /// What one batch of packets did to the publishes in flight, in order.
    Progress(Vec<Progress>),
    /// `suspect`: the oldest publish written and not acknowledged was this publisher's (always
    /// so on a connection of its own), so a quick end may be a refusal of it.
    Disconnected {
        suspect: bool,
    },
}

/// A publish in flight moved on.
pub(super) enum Progress {
    /// A publish with this packet id was written to the socket.
    Sent { tenant: Tenant, pkid: u16 },
    /// The broker acknowledged it; `refused`: its reason code when it refused the message
    /// (MQTT 5).
    Acked {
        tenant: Tenant,
        pkid: u16,
        refused: Option<String>,
    },
}

impl Progress {
    pub fn tenant(&self) -> Tenant {
        match self {
            Progress::Sent { tenant, .. } | Progress::Acked { tenant, .. } => *tenant,
        }
    }

    /// A QoS 1 publish written: its publisher has nothing to do until the acknowledgement (or
    /// the connection's end) comes, so on a shared connection it need not be woken for it.
    /// A QoS 0 publish (packet id 0) is done once written, and frees room in the window.
    fn can_wait(&self) -> bool {
        matches!(self, Progress::Sent { pkid, .. } if *pkid != 0)
    }
}

/// Who hears of a connection: the publisher of its relay's side, or, on a connection that
/// relays share, every sharing relay's publisher (each hears of its own publishes only).
pub(super) enum Peers {
    Own(mpsc::UnboundedSender<ConnEvent>),
    Shared(Arc<Tenants>),
}

impl Peers {
    pub fn connected(&self, client: &Client) {
        match self {
            Peers::Own(events) => {
                let _ = events.send(ConnEvent::Connected {
                    client: client.clone(),
                });
            }
            Peers::Shared(tenants) => tenants.connected(client),
        }
    }

    pub fn progress(&self, steps: Vec<Progress>) {
        match self {
            Peers::Own(events) => {
                let _ = events.send(ConnEvent::Progress(steps));
            }
            Peers::Shared(tenants) => tenants.progress(steps),
        }
    }

    /// `suspect`: whose publish was the oldest written and not acknowledged, if any.
    pub fn disconnected(&self, suspect: Option<Tenant>) {
        match self {
            Peers::Own(events) => {
                let _ = events.send(ConnEvent::Disconnected { suspect: true });
            }
            Peers::Shared(tenants) => tenants.disconnected(suspect),
        }
    }

    pub fn state(&self, ctx: &Context, side: Side, state: SideState, error: Option<String>) {
        match self {
            Peers::Own(_) => ctx.report.state(side, state, error),
            Peers::Shared(tenants) => tenants.state(side, state, error),
        }
    }

    pub fn reconnected(&self, ctx: &Context, side: Side) {
        match self {
            Peers::Own(_) => ctx.report.reconnected(side),
            Peers::Shared(tenants) => tenants.reconnected(side),
        }
    }

    /// The broker refused some of a SUBSCRIBE's filters: (the filter where known, the reason
    /// code). On a shared connection, only the relays whose routes they concern are told.
    pub fn subscription_refused(
        &self,
        ctx: &Context,
        side: Side,
        refused: &[(Option<String>, String)],
    ) {
        match self {
            Peers::Own(_) => ctx
                .report
                .subscription_refused(refusal_message(side, refused)),
            Peers::Shared(tenants) => tenants.subscription_refused(side, refused),
        }
    }

    /// All SUBACKs of a connection's subscribe are in: these filters were refused (`None`: one
    /// whose filter is not known). On a shared connection each relay counts its own.
    pub fn subscriptions_refused(&self, ctx: &Context, side: Side, refused: &[Option<String>]) {
        match self {
            Peers::Own(_) => ctx.report.subscriptions_refused(side, refused.len()),
            Peers::Shared(tenants) => tenants.subscriptions_refused(side, refused),
        }
    }

    /// Before a new connection: forgets the members of a shared connection that left.
    pub fn forget_departed(&self) {
        if let Peers::Shared(tenants) = self {
            tenants.forget_departed();
        }
    }

    /// Filters that only relays that have gone subscribed (see [`Tenants::forget_departed`]),
    /// or that the relays a joining one replaced subscribed (`Endpoint::unsubscribe`), less
    /// what a member reads now.
    pub fn take_leftover(&self) -> Vec<String> {
        match self {
            Peers::Own(_) => Vec::new(),
            Peers::Shared(tenants) => {
                let leftover = std::mem::take(&mut tenants.lock().leftover);
                // A relay that joined since may read one of them again.
                let now = tenants.subscriptions();
                leftover
                    .into_iter()
                    .filter(|f| !now.iter().any(|(s, _)| s == f))
                    .collect()
            }
        }
    }

    /// When to reconnect for the members of a shared connection that left (see
    /// [`Tenants::rejoin_at`]).
    pub fn rejoin_at(&self) -> Option<Instant> {
        match self {
            Peers::Own(_) => None,
            Peers::Shared(tenants) => tenants.rejoin_at(),
        }
    }
}

/// The message for subscriptions a broker refused on `side`: the filters (where known) and
/// the reason codes.
fn refusal_message(side: Side, refused: &[(Option<String>, String)]) -> String {
    let filters: Vec<&str> = refused.iter().filter_map(|(f, _)| f.as_deref()).collect();
    let mut codes: Vec<&str> = refused.iter().map(|(_, c)| c.as_str()).collect();
    codes.dedup();
    let to = if filters.is_empty() {
        String::new()
    } else {
        format!(" to {}", filters.join(", "))
    };
    format!(
        "{}: the broker refused a subscription{to} ({}; check the policy's iot:Subscribe/iot:Receive permissions)",
        side.as_str(),
        codes.join(", ")
    )
}

/// Up to this many relays on a source connection, each one's routes see every message; above,
/// only those of the relays whose filters match (looked up in the index).
const FEW_MEMBERS: usize = 4;

/// One sharing relay.
impl Member {
    /// Hands the publisher the steps held for it, if any.
    fn hand_held(&mut self) {
        if !self.held.is_empty() {
            let _ = self
                .events
                .send(ConnEvent::Progress(std::mem::take(&mut self.held)));
        }
    }

    /// Whether a refused subscription to `filter` (`None`: not known) concerns this relay (see
    /// [`concerns`]); a relay without routes here is told every refusal.
    fn concerned_by(&self, filter: Option<&str>) -> bool {
        match (filter, &self.router) {
            (Some(filter), Some(router)) => concerns(router.routes(), filter),
            _ => true,
        }
    }
}

/// Whether a refused subscription to `filter` leaves one of `routes` without messages: it is
/// one of their subscriptions, or a wider filter theirs were folded into.
pub(super) fn concerns(routes: &[RouteConfig], filter: &str) -> bool {
    let wider = TopicFilter::parse(filter).ok();
    routes.iter().any(|r| {
        r.subscription() == filter
            || (r.share.is_none() && wider.as_ref().is_some_and(|w| w.covers(&r.filter)))
    })
}

/// One SUBSCRIBE a relay sent as it joined a shared source connection that was up.
pub(super) struct JoinSubscribe {
    pub tenant: Tenant,
    pub filters: Vec<String>,
    /// The last SUBSCRIBE of that join.
    pub last: bool,
}

pub(super) struct Member {
    pub id: Tenant,
    pub events: mpsc::UnboundedSender<ConnEvent>,
    pub ctx: Arc<Context>,
    /// On a source connection: the relay's routing of what it reads.
    pub router: Option<Router>,
    /// When the relay left a source connection. Until the connection reconnects it still
    /// holds back (never acknowledges) what its routes match, so that nothing meant for it is
    /// acknowledged before its successor has joined.
    pub departed: Option<Instant>,
    /// Joined a source connection while a relay that left still held messages back: holds back
    /// what its routes match too, until the connection reconnects, so that it reads those
    /// messages (delivered again then) before any that came after them.
    pub waiting: bool,
    /// Steps of this member's publishes not handed over yet: QoS 1 publishes written (see
    /// [`Progress::can_wait`]), handed over with the next step that cannot wait, or before the
    /// connection's end. With hundreds of relays on one sink, each written message woke its
    /// publisher once for being written and once for being acknowledged.
    pub held: Vec<Progress>,
}

#[derive(Default)]
pub(super) struct Table {
    /// Ordered by id.
    pub members: Vec<Member>,
    pub next: Tenant,
    /// The connection's client while it is up.
    pub client: Option<Client>,
    /// The connection's last state and error, for a tenant that joins.
    pub state: Option<(SideState, Option<String>)>,
    /// When the last relay joined.
    pub last_join: Option<Instant>,
    /// Filters subscribed for relays that have gone, to unsubscribe on the next connection
    /// (after subscribing what the others read).
    pub leftover: Vec<String>,
    /// The SUBSCRIBEs of relays that joined while the connection was up, in the order sent:
    /// their SUBACKs follow those of the connection's own subscribe.
    pub joins: VecDeque<JoinSubscribe>,
    /// Filters refused so far in the SUBACKs of the join being answered.
    join_refused: usize,
    /// Which members take the message being routed, and with which routes (kept to reuse).
    takes: Vec<(usize, u64)>,
    /// Which members' filters match a topic (see [`Table::add`]).
    index: FilterTree<Tenant>,
    /// The members a message is for (kept to reuse).
    candidates: Vec<Tenant>,
    /// The members that have progress to be handed now (kept to reuse).
    urgent: Vec<usize>,
    /// The backlog of a member that a message just filled (a backlog grows only by what is
    /// routed to it, so this is where to look, instead of every member's, before each read).
    full: Option<(Arc<Backlog>, Arc<RelayStats>)>,
}

impl Table {
    /// Adds a member (ids grow, so members stay ordered by id).
    pub fn add(&mut self, member: Member) {
        index(&mut self.index, &member);
        self.members.push(member);
    }

    /// Rebuilds the index of the members' filters (after members were taken out).
    fn reindex(&mut self) {
        let mut tree = FilterTree::default();
        for m in &self.members {
            index(&mut tree, m);
        }
        self.index = tree;
    }

    /// The connection is up: keeps its client and hands each member its own.
    fn connected(&mut self, client: &Client) {
        self.client = Some(client.clone());
        for m in &mut self.members {
            m.hand_held();
            let _ = m.events.send(ConnEvent::Connected {
                client: client.for_tenant(m.id),
            });
        }
    }

    fn member(&self, id: Tenant) -> Option<&Member> {
        position(&self.members, id).map(|i| &self.members[i])
    }
}

/// Where the member `id` is in `members` (ordered by id), if it is there.
pub(super) fn position(members: &[Member], id: Tenant) -> Option<usize> {
    members.binary_search_by_key(&id, |m| m.id).ok()
}

/// What the members' routes subscribe to (see [`Tenants::subscriptions`]).
fn table_subscriptions(t: &Table) -> Vec<(String, QoS)> {
    subscriptions(
        t.members
            .iter()
            .filter_map(|m| m.router.as_ref())
            .flat_map(|r| r.routes()),
    )
}

/// Adds `m`'s filters to the index of a source connection's members.
fn index(tree: &mut FilterTree<Tenant>, m: &Member) {
    for r in m.router.iter().flat_map(|r| r.routes()) {
        tree.insert(&r.filter, m.id);
    }
}

/// The tenants of one shared connection: what the connection tells them.
pub(super) struct Tenants {
    table: Mutex<Table>,
    /// Told when a relay joins or leaves a source connection.
    pub nudge: Notify,
}

impl Tenants {
    pub fn new() -> Self {
        Tenants {
            table: Mutex::new(Table::default()),
            nudge: Notify::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing in the table is left half-updated by a panic.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes a message read on a shared source through every member's routes. The original is
    /// acknowledged once every copy is done, at once when nobody takes it, and never while a
    /// member withholds it (it is draining, or has left): the connection reconnects after such
    /// a member has gone, and the broker delivers it again.
    pub fn route(&self, client: &Client, p: &Message, received: Instant) {
        let mut guard = self.lock();
        let Table {
            members,
            takes,
            full,
            index,
            candidates,
            ..
        } = &mut *guard;
        // One relay on the connection (the common case): as on a connection of its own.
        if let [m] = members.as_mut_slice() {
            if let Some(router) = m.router.as_mut() {
                let hold = m.departed.is_some() || m.waiting;
                router.route(&m.ctx, client, p, received, hold);
                if router.backlog.full() {
                    *full = Some((router.backlog.clone(), m.ctx.report.stats.clone()));
                }
            } else if p.qos != QoS::AtMostOnce {
                client.try_ack(p.pkid);
            }
            return;
        }
        // Nobody on the connection yet, or any more: what it reads is nobody's to take, and
        // not anybody's to drop either. Left unacknowledged, so that the broker delivers it
        // again on the next connection of the session. (Acknowledged as unwanted, it was lost:
        // a persistent session's queue, read by a connection that came up before its first
        // relay had joined.)
        if members.is_empty() {
            return;
        }
        takes.clear();
        // Only the members with a filter that matches, found through the index (with hundreds
        // of members, asking each one's routes cost more than the rest of the message's path).
        candidates.clear();
        if members.len() <= FEW_MEMBERS {
            candidates.extend(members.iter().map(|m| m.id));
        } else {
            index.find(&p.topic, &mut |id: &Tenant| candidates.push(*id));
            candidates.sort_unstable();
            candidates.dedup();
        }
        let (mut copies, mut withheld) = (0usize, false);
        for id in candidates.iter() {
            let Some(i) = position(members, *id) else {
                continue;
            };
            let m = &mut members[i];
            let Some(router) = m.router.as_mut() else {
                continue;
            };
            match router.take(&m.ctx, p, received, m.departed.is_some() || m.waiting) {
                Take::Nothing => {}
                Take::Withhold => withheld = true,
                Take::Routes(wanted) => {
                    copies += wanted.count_ones() as usize;
                    takes.push((i, wanted));
                }
            }
        }
        if copies == 0 {
            if !withheld && p.qos != QoS::AtMostOnce {
                client.try_ack(p.pkid);
            }
            return;
        }
        // A withheld copy is never done, so the original is never acknowledged.
        let origins = Origins::new(client, p, copies + usize::from(withheld));
        let properties = p.properties.clone().map(Arc::new);
        for &(i, wanted) in takes.iter() {
            if let Some(router) = members[i].router.as_mut() {
                router.forward(p, wanted, &properties, &origins, received);
                if router.backlog.full() {
                    *full = Some((router.backlog.clone(), members[i].ctx.report.stats.clone()));
                }
            }
        }
    }

    /// The backlog of a present member that routing filled: reading stops until it has room.
    /// Also the stats of the relay it belongs to.
    pub fn full_backlog(&self) -> Option<(Arc<Backlog>, Arc<RelayStats>)> {
        let (backlog, stats) = self.lock().full.take()?;
        (backlog.full() && self.holds(&backlog)).then_some((backlog, stats))
    }

    /// Whether `backlog` is still a present member's.
    pub fn holds(&self, backlog: &Arc<Backlog>) -> bool {
        self.lock()
            .members
            .iter()
            .filter(|m| m.departed.is_none())
            .filter_map(|m| m.router.as_ref())
            .any(|r| Arc::ptr_eq(&r.backlog, backlog))
    }

    /// What the members' routes subscribe to, members that left included (their filters stay
    /// until the connection reconnects).
    pub fn subscriptions(&self) -> Vec<(String, QoS)> {
        table_subscriptions(&self.lock())
    }

    /// A source connection is up: subscribes what the members read (`subscribe` sends the
    /// SUBSCRIBEs and returns the filters of each) and tells the members the client, at one
    /// moment, so that a relay that joins meanwhile is in one or subscribes itself after it.
    /// Returns what `subscribe` returned.
    pub fn connect(
        &self,
        client: &Client,
        subscribe: impl FnOnce(&[(String, QoS)]) -> Vec<Vec<String>>,
    ) -> Vec<Vec<String>> {
        let mut t = self.lock();
        let sent = subscribe(&table_subscriptions(&t));
        t.joins.clear();
        t.join_refused = 0;
        t.connected(client);
        sent
    }

    /// The SUBACK of a SUBSCRIBE a relay sent as it joined (the next in [`Table::joins`]):
    /// the refused filters are told to that relay alone, and counted once its last SUBACK is
    /// in. `false` when no join's SUBACK is due.
    pub fn joined_suback(
        &self,
        side: Side,
        results: &[Option<String>],
        span: &tracing::Span,
    ) -> bool {
        let mut t = self.lock();
        let Some(join) = t.joins.pop_front() else {
            return false;
        };
        let refused: Vec<(Option<String>, String)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, code)| Some((join.filters.get(i).cloned(), code.clone()?)))
            .collect();
        t.join_refused += refused.len();
        let count = t.join_refused;
        if join.last {
            t.join_refused = 0;
        }
        // A relay that has left since needs no telling.
        let Some(m) = t.member(join.tenant).filter(|m| m.departed.is_none()) else {
            return true;
        };
        if !refused.is_empty() {
            tracing::warn!(parent: span, bridge = %m.ctx.report.name, refused = ?refused, "{}: the broker refused subscriptions", side.as_str());
            m.ctx
                .report
                .subscription_refused(refusal_message(side, &refused));
        }
        if join.last {
            m.ctx.report.subscriptions_refused(side, count);
        }
        true
    }

    /// When the connection should reconnect so that the broker delivers again what members
    /// that left held back: at once if a relay joined after they left, else after
    /// [`REJOIN_GRACE`].
    pub fn rejoin_at(&self) -> Option<Instant> {
        let t = self.lock();
        t.members
            .iter()
            .filter_map(|m| m.departed)
            .map(|left| match t.last_join {
                Some(joined) if joined >= left => Instant::now(),
                _ => left + REJOIN_GRACE,
            })
            .min()
    }

    /// Forgets the members that left and whose time is up (see [`Tenants::rejoin_at`]); called
    /// before each new connection. What only they subscribed is left over, to unsubscribe.
    pub fn forget_departed(&self) {
        let mut t = self.lock();
        let now = Instant::now();
        let last_join = t.last_join;
        let gone = |m: &Member| {
            m.departed.is_some_and(|left| {
                last_join.is_some_and(|j| j >= left) || now.duration_since(left) >= REJOIN_GRACE
            })
        };
        let (forgotten, kept): (Vec<Member>, Vec<Member>) =
            std::mem::take(&mut t.members).into_iter().partition(gone);
        t.members = kept;
        t.reindex();
        if !forgotten.is_empty() {
            let filters = |members: &[Member]| {
                subscriptions(
                    members
                        .iter()
                        .filter_map(|m| m.router.as_ref())
                        .flat_map(|r| r.routes()),
                )
            };
            let still = filters(&t.members);
            let leftover: Vec<String> = filters(&forgotten)
                .into_iter()
                .map(|(f, _)| f)
                .filter(|f| !still.iter().any(|(s, _)| s == f))
                .collect();
            t.leftover.extend(leftover);
        }
        if t.members.iter().all(|m| m.departed.is_none()) {
            for m in &mut t.members {
                m.waiting = false;
            }
        }
    }

    /// Tells each member whose routes a refused subscription concerns (every member, for one
    /// whose filter is not known).
    pub fn subscription_refused(&self, side: Side, refused: &[(Option<String>, String)]) {
        for m in &self.lock().members {
            let own: Vec<(Option<String>, String)> = refused
                .iter()
                .filter(|(f, _)| m.concerned_by(f.as_deref()))
                .cloned()
                .collect();
            if !own.is_empty() {
                m.ctx
                    .report
                    .subscription_refused(refusal_message(side, &own));
            }
        }
    }

    /// Each member counts the refused subscriptions that concern its routes.
    pub fn subscriptions_refused(&self, side: Side, refused: &[Option<String>]) {
        for m in &self.lock().members {
            let own = refused
                .iter()
                .filter(|f| m.concerned_by(f.as_deref()))
                .count();
            m.ctx.report.subscriptions_refused(side, own);
        }
    }

    pub fn connected(&self, client: &Client) {
        self.lock().connected(client);
    }

    /// Hands each tenant the steps of its own publishes, in order. Steps that can wait are
    /// held until one that cannot comes for the same tenant (see [`Member::held`]).
    pub fn progress(&self, steps: Vec<Progress>) {
        let mut t = self.lock();
        let Table {
            members, urgent, ..
        } = &mut *t;
        for step in steps {
            // A tenant that has left has no publisher to tell.
            let Some(i) = position(members, step.tenant()) else {
                continue;
            };
            let m = &mut members[i];
            if !step.can_wait() && urgent.last() != Some(&i) {
                urgent.push(i);
            }
            m.held.push(step);
        }
        urgent.sort_unstable();
        urgent.dedup();
        for i in urgent.drain(..) {
            members[i].hand_held();
        }
    }

    pub fn disconnected(&self, suspect: Option<Tenant>) {
        let mut t = self.lock();
        t.client = None;
        for m in &mut t.members {
            m.hand_held();
            let _ = m.events.send(ConnEvent::Disconnected {
                suspect: suspect == Some(m.id),
            });
        }
    }

    pub fn state(&self, side: Side, state: SideState, error: Option<String>) {
        let mut t = self.lock();
        for m in &t.members {
            m.ctx.report.state(side, state, error.clone());
        }
        t.state = Some((state, error));
    }

    pub fn reconnected(&self, side: Side) {
        for m in &self.lock().members {
            m.ctx.report.reconnected(side);
        }
    }

    /// Whether every relay has left (those that left a source may still be listed, holding
    /// back what their routes match until the connection has closed).
    pub fn is_empty(&self) -> bool {
        self.lock().members.iter().all(|m| m.departed.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicTemplate;
    use crate::vocab::{Direction, RetainHandling};

    fn route(filter: &str, share: Option<&str>) -> RouteConfig {
        RouteConfig {
            name: filter.into(),
            filter: TopicFilter::parse(filter).expect("filter"),
            template: TopicTemplate::same_topic(),
            qos: 1,
            retain: RetainHandling::Preserve,
            direction: Direction::In,
            share: share.map(str::to_owned),
        }
    }

    #[test]
    fn a_refused_subscription_concerns_the_routes_it_would_have_fed() {
        let a = [route("secret/#", None)];
        let b = [
            route("devices/+/telemetry", None),
            route("jobs/#", Some("g")),
        ];
        // Its own filter.
        assert!(concerns(&a, "secret/#"));
        assert!(!concerns(&b, "secret/#"));
        // A wider filter its route was folded into (shared with a bridge that reads more).
        assert!(concerns(&b, "+/+/telemetry"));
        assert!(!concerns(&a, "+/+/telemetry"));
        // A shared subscription is its own; its filter alone is not.
        assert!(concerns(&b, "$share/g/jobs/#"));
        assert!(!concerns(&b, "jobs/#"));
        assert!(!concerns(&b, "$share/other/jobs/#"));
    }

    #[test]
    fn the_refusal_message_names_the_filters_and_the_codes() {
        let refused = [
            (Some("secret/#".to_owned()), "Failure".to_owned()),
            (Some("admin/#".to_owned()), "Failure".to_owned()),
        ];
        assert_eq!(
            refusal_message(Side::Source, &refused),
            "source: the broker refused a subscription to secret/#, admin/# (Failure; check the \
             policy's iot:Subscribe/iot:Receive permissions)"
        );
        // A SUBACK no SUBSCRIBE is known for: the codes alone.
        let unknown = [(None, "NotAuthorized".to_owned())];
        assert_eq!(
            refusal_message(Side::Source, &unknown),
            "source: the broker refused a subscription (NotAuthorized; check the policy's \
             iot:Subscribe/iot:Receive permissions)"
        );
    }
}
