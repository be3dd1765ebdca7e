//! One side's connection: polls rumqttc's event loop, reconnects with backoff (a fresh event
//! loop per connection, a freshly signed URL where there is a signer), subscribes, hands what
//! it reads to the [`Router`] (or, on a source connection that relays share, to each sharing
//! relay's router), and tells its side's publisher about connection events. It never waits for
//! the other side, except to stop reading while the other side catches up.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use rumqttc::QoS;
use tokio::sync::{mpsc, watch};

use super::Context;
use super::backlog::Backlog;
use super::config::Endpoint;
use super::mqtt::Message;
use super::mqtt::{Client, EventLoop, Failure, Link, Polled, Tenant, V4, V5};
use super::options::{MQTT_MAX_REMAINING, connect, read_limit_packet, redact};
use super::peers::{Peers, Progress, Tenants};
use super::routing::{Router, subscriptions};
use super::status::{RelayStats, Side, SideState};
use std::collections::VecDeque;

/// Batches of events handled between two checks of stop, renewal and retire while the event
/// loop is never idle.
const CHECK_EVERY: u32 = 32;

/// What woke a session.
enum Woke {
    Polled(Result<(), Failure>),
    Stop,
    Renew,
    Retire,
    /// A relay joined or left the shared connection.
    Nudged,
}

/// Where a connection's messages go.
pub(super) enum Routing {
    /// Its relay's router.
    Own(Router),
    /// The routers of the relays that share it (none on a sink).
    Shared(Arc<Tenants>),
}

impl Routing {
    fn route(&mut self, ctx: &super::Context, client: &Client, message: Message, at: Instant) {
        match self {
            Routing::Own(router) => router.route(ctx, client, &message, at, false),
            Routing::Shared(tenants) => tenants.route(client, &message, at),
        }
    }

    /// A backlog that is full: reading stops until it has room. Also the stats of the relay
    /// that waits (`own`'s on a connection of its own).
    fn full_backlog(&self, own: &Arc<RelayStats>) -> Option<(Arc<Backlog>, Arc<RelayStats>)> {
        match self {
            Routing::Own(router) => router
                .backlog
                .full()
                .then(|| (router.backlog.clone(), own.clone())),
            Routing::Shared(tenants) => tenants.full_backlog(),
        }
    }

    /// Whether a relay of this connection still owns `backlog` (one that left is not waited
    /// for).
    fn holds(&self, backlog: &Arc<Backlog>) -> bool {
        match self {
            Routing::Own(_) => true,
            Routing::Shared(tenants) => tenants.holds(backlog),
        }
    }

    fn subscriptions(&self) -> Vec<(String, QoS)> {
        match self {
            Routing::Own(router) => subscriptions(router.routes()),
            Routing::Shared(tenants) => tenants.subscriptions(),
        }
    }

    fn tenants(&self) -> Option<Arc<Tenants>> {
        match self {
            Routing::Own(_) => None,
            Routing::Shared(tenants) => Some(tenants.clone()),
        }
    }
}

/// When to reconnect for the relays that left the shared connection, if before `deadline`.
fn rejoin_before(peers: &Peers, deadline: tokio::time::Instant) -> Option<tokio::time::Instant> {
    let at = tokio::time::Instant::from_std(peers.rejoin_at()?);
    (at < deadline).then_some(at)
}

/// Until a relay joins or leaves the shared connection of `tenants` (never, without one).
async fn nudged(tenants: Option<Arc<Tenants>>) {
    match tenants {
        Some(t) => t.nudge.notified().await,
        None => std::future::pending().await,
    }
}

/// How one connection ended.
enum Ended {
    Stopped,
    /// Time for freshly signed credentials.
    Renew,
    /// A relay left the shared connection: the broker delivers again what it held back.
    Rejoin,
    Failed {
        error: String,
        /// The HTTP status that refused the WebSocket handshake.
        http_status: Option<u16>,
        was_connected: bool,
        /// The broker sent a packet over the read limit, of this remaining length.
        oversized: Option<usize>,
        /// Whose publish was the oldest written and not acknowledged.
        suspect: Option<Tenant>,
    },
}

/// One side's connection, across reconnects.
pub(super) struct Connection {
    pub ctx: Arc<Context>,
    pub side: Side,
    pub endpoint: Endpoint,
    pub peers: Peers,
    pub routing: Routing,
    pub stop: watch::Receiver<bool>,
    /// Set when the relay is retired for good: leave the shared subscriptions first.
    pub retire: watch::Receiver<bool>,
    /// Told once this side has left its shared subscriptions (a side with none never tells).
    pub retired: mpsc::UnboundedSender<()>,
    /// Names the bridge and side on every log line of this connection. The lines name it as
    /// their parent: entering a span on every poll of this loop would cost on every message.
    pub span: tracing::Span,
}

impl Connection {
    /// Connects, and reconnects, until the relay stops.
    pub async fn run(mut self) {
        let ctx = self.ctx.clone();
        let side = self.side;
        let mut attempt: u32 = 0;
        let mut first = true;
        let mut ever_connected = false;
        // Raised for one connection after the broker sent a message over the limit: the
        // message is taken in and dropped, instead of breaking every connection after it.
        let mut read_limit = self.endpoint.max_message_bytes;
        loop {
            if *self.stop.borrow() {
                break;
            }
            self.peers.forget_departed();
            if let Some(permit) = &ctx.config.connect_permit
                && !permit.allows()
            {
                tracing::debug!(parent: &self.span, "not permitted to connect now");
                if self.sleep_or_stop(ctx.config.reconnect_min).await {
                    break;
                }
                continue;
            }
            // A fresh signature for every attempt.
            let (url, expires) = match &self.endpoint.signer {
                Some(signer) => match signer.signed_url().await {
                    Ok(s) => (s.url, s.credentials_expire),
                    Err(e) => {
                        tracing::warn!(parent: &self.span, reason = e.reason(), error = %e, "signing the connection URL failed");
                        let state = if ever_connected {
                            SideState::Disrupted
                        } else {
                            SideState::Connecting
                        };
                        self.peers.state(
                            &ctx,
                            side,
                            state,
                            Some(format!("{}: {e}", side.as_str())),
                        );
                        if self.sleep_or_stop(ctx.reconnect_delay(attempt)).await {
                            break;
                        }
                        attempt += 1;
                        continue;
                    }
                },
                None => (crate::vocab::Secret::new(self.endpoint.url.clone()), None),
            };
            // Publishes (at most `window`) and acknowledgements (at most one per packet id the
            // broker has in flight to us) share the request queue. It is sized so that an
            // acknowledgement never waits, even while reading is paused for backpressure (which
            // stops draining it): a wait there would stall the other side's publisher, which is
            // what unpauses reading. flume allocates per queued request, not for the capacity.
            let queue = 2 * ctx.config.window + 16 + usize::from(u16::MAX);
            let (client, mut eventloop) =
                match connect(&self.endpoint, url.expose(), read_limit, queue) {
                    Ok(c) => c,
                    Err(e) => {
                        let msg = redact(&e.to_string(), &self.endpoint);
                        self.peers.state(
                            &ctx,
                            side,
                            SideState::Connecting,
                            Some(format!("{}: {msg}", side.as_str())),
                        );
                        if self.sleep_or_stop(ctx.config.reconnect_max).await {
                            break;
                        }
                        continue;
                    }
                };
            drop(url);
            let mut deadline = tokio::time::Instant::now() + ctx.config.max_connection_age;
            if let Some(exp) = expires
                && let Ok(left) = exp.duration_since(SystemTime::now())
            {
                let renew_in = left
                    .saturating_sub(ctx.config.credential_margin)
                    .max(Duration::from_secs(30));
                deadline = deadline.min(tokio::time::Instant::now() + renew_in);
            }
            let ended = match &mut eventloop {
                EventLoop::V4(l) => self.session::<V4>(&client, l, deadline, first).await,
                // Boxed, once per connection: the MQTT 5 loop's future would otherwise size
                // every connection's task (3.1.1 included) for itself.
                EventLoop::V5(l) => Box::pin(self.session::<V5>(&client, l, deadline, first)).await,
            };
            let connected_once = !matches!(
                ended,
                Ended::Failed {
                    was_connected: false,
                    ..
                }
            );
            read_limit = self.endpoint.max_message_bytes;
            match ended {
                Ended::Stopped => break,
                Ended::Renew => {
                    tracing::info!(parent: &self.span, "reconnecting with fresh credentials");
                    self.peers.disconnected(None);
                    attempt = 0;
                }
                Ended::Rejoin => {
                    tracing::info!(
                        parent: &self.span,
                        "a bridge left this shared connection: reconnecting, so that the broker delivers again what it held back"
                    );
                    self.peers.disconnected(None);
                    attempt = 0;
                }
                Ended::Failed {
                    was_connected,
                    oversized: Some(n),
                    ..
                } if n <= MQTT_MAX_REMAINING && n > read_limit_packet(&self.endpoint) => {
                    // Take it in on the next connection (at once), then drop it.
                    tracing::warn!(
                        parent: &self.span, bytes = n,
                        limit = self.endpoint.max_message_bytes,
                        "the broker sent a message over this side's maxMessageBytes; reconnecting to take it in and drop it"
                    );
                    if was_connected {
                        self.peers.reconnected(&ctx, side);
                    }
                    self.peers.disconnected(None);
                    read_limit = n;
                    if self.sleep_or_stop(ctx.config.reconnect_min).await {
                        break;
                    }
                }
                Ended::Failed {
                    error,
                    http_status,
                    was_connected,
                    suspect,
                    ..
                } => {
                    let mut error = redact(&error, &self.endpoint);
                    if self.endpoint.signer.is_some() && http_status == Some(403) {
                        // AWS IoT answers a refused signature or policy with a bare 403.
                        error.push_str(
                            " (AWS IoT refused the signed connection: check the credentials, the \
                             region and the machine's clock, and that the identity may iot:Connect \
                             with this client id)",
                        );
                    }
                    if was_connected {
                        ever_connected = true;
                        attempt = 0;
                        self.peers.reconnected(&ctx, side);
                    }
                    tracing::warn!(parent: &self.span, error = %error, "connection lost");
                    self.peers.disconnected(suspect);
                    let state = if ever_connected {
                        SideState::Disrupted
                    } else {
                        SideState::Connecting
                    };
                    self.peers.state(
                        &ctx,
                        side,
                        state,
                        Some(format!("{}: {error}", side.as_str())),
                    );
                    if self.sleep_or_stop(ctx.reconnect_delay(attempt)).await {
                        break;
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
            if connected_once {
                first = false;
            }
        }
        self.peers.state(&ctx, side, SideState::Stopped, None);
    }

    /// Sleeps, returning true if the relay is stopping.
    async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        let stopped = tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.stop.wait_for(|s| *s) => true,
        };
        stopped || *self.stop.borrow()
    }

    /// One connection, from CONNECT until it ends.
    async fn session<L: Link>(
        &mut self,
        client: &Client,
        eventloop: &mut L::Loop,
        deadline: tokio::time::Instant,
        first: bool,
    ) -> Ended {
        let ctx = self.ctx.clone();
        let side = self.side;
        let mut connected = false;
        // The filters of each SUBSCRIBE of this connection's subscribe whose SUBACK is still
        // due, in the order sent (a broker answers a connection's SUBSCRIBEs in order).
        let mut subscribed: VecDeque<Vec<String>> = VecDeque::new();
        let mut pending_subacks = 0usize;
        // Topic filters refused by the SUBACKs of this connection's subscribe so far (`None`:
        // a SUBACK no SUBSCRIBE of this list is known for).
        let mut refused_filters: Vec<Option<String>> = Vec::new();
        // The reason an MQTT 5 broker gave in its DISCONNECT, for the error that follows.
        let mut told: Option<String> = None;
        // Made once per connection, not once per event: on the message path their setup cost
        // (timer registration, watch subscription) showed up in the profile.
        let mut stop = self.stop.clone();
        let stopped = stop.wait_for(|s| *s);
        let renew = tokio::time::sleep_until(deadline);
        let mut retire = self.retire.clone();
        let retiring = retire.wait_for(|r| *r);
        let tenants = self.routing.tenants();
        let nudge = nudged(tenants.clone());
        // Set when the renewal deadline was brought forward to reconnect for relays that left.
        let mut rejoining = false;
        let mut deadline = deadline;
        let mut unsubscribing: Option<usize> = None;
        // UNSUBACKs due for the subscriptions a previous relay made (`Endpoint::unsubscribe`),
        // which this connection asked for first.
        let mut forgetting = 0usize;
        let mut rounds: u32 = 0;
        // Events of one poll, and what they did to the publishes in flight.
        let mut batch = VecDeque::new();
        let mut progress = Vec::new();
        tokio::pin!(stopped, renew, retiring, nudge);
        if let Some(at) = rejoin_before(&self.peers, deadline) {
            (deadline, rejoining) = (at, true);
            renew.as_mut().reset(at);
        }
        loop {
            // The other side is behind: stop reading (the broker's socket fills and it holds
            // its messages) until it has caught up, instead of dropping or buffering without
            // bound.
            if let Some((backlog, stats)) = self.routing.full_backlog(&ctx.report.stats) {
                let paused = Instant::now();
                stats.paused.fetch_add(1, Ordering::Relaxed);
                loop {
                    if !backlog.wait_for_room(&mut stopped).await {
                        L::close(eventloop, client).await;
                        return Ended::Stopped;
                    }
                    if backlog.low() || !self.routing.holds(&backlog) {
                        break;
                    }
                }
                tracing::debug!(
                    parent: &self.span, paused_ms = paused.elapsed().as_millis() as u64,
                    "reading paused while the other side caught up"
                );
            }
            // The event loop is polled first: while it has events, the stop, renewal and
            // retire futures are not polled (each poll of a watch takes its lock), except every
            // `CHECK_EVERY` batches, so that a stream that never pauses cannot hold them off.
            rounds = rounds.wrapping_add(1);
            let may_retire = connected && unsubscribing.is_none();
            let due = if rounds.is_multiple_of(CHECK_EVERY) {
                self.due(deadline, may_retire)
            } else {
                None
            };
            // The select only says what woke it: a watch's guard must not live across the
            // close below.
            let woke = match due {
                Some(woke) => woke,
                None => tokio::select! {
                    biased;
                    r = L::poll(eventloop, &mut batch) => Woke::Polled(r),
                    _ = &mut stopped => Woke::Stop,
                    _ = &mut renew => Woke::Renew,
                    _ = &mut retiring, if may_retire => Woke::Retire,
                    _ = &mut nudge => Woke::Nudged,
                },
            };
            let polled = match woke {
                Woke::Polled(r) => r,
                Woke::Stop => {
                    L::close(eventloop, client).await;
                    return Ended::Stopped;
                }
                Woke::Renew => {
                    L::close(eventloop, client).await;
                    return if rejoining {
                        Ended::Rejoin
                    } else {
                        Ended::Renew
                    };
                }
                Woke::Nudged => {
                    nudge.set(nudged(tenants.clone()));
                    if let Some(at) = rejoin_before(&self.peers, deadline) {
                        (deadline, rejoining) = (at, true);
                        renew.as_mut().reset(at);
                    }
                    continue;
                }
                Woke::Retire => {
                    // A side without shared subscriptions has nothing to leave and is not
                    // waited for.
                    unsubscribing = Some(self.leave_shared_subscriptions(client));
                    continue;
                }
            };
            if let Err(Failure { error, oversized }) = polled {
                let http_status = error.http_status();
                let error = crate::error::chain(&error);
                let error = match told.take() {
                    Some(reason) => format!("{error} (the broker's DISCONNECT reason: {reason})"),
                    None => error,
                };
                return Ended::Failed {
                    error,
                    http_status,
                    was_connected: connected,
                    oversized,
                    suspect: L::suspect(eventloop),
                };
            }
            // When this batch was read, for every message in it (one clock read).
            let mut read_at = None;
            // Room for the batch's progress at once (the last report took the list).
            progress.reserve(batch.len());
            while let Some(raw) = batch.pop_front() {
                match L::convert(eventloop, raw) {
                    Polled::ConnAck { session_present } => {
                        connected = true;
                        tracing::info!(parent: &self.span, session_present, "connected");
                        // The queue of a fresh event loop is empty, so these requests cannot
                        // block.
                        refused_filters.clear();
                        // A shared connection subscribes every time: its relays may have
                        // changed while it was away.
                        subscribed = match &tenants {
                            // The members' filters are subscribed, and the members told the
                            // client, at one moment: a relay joins before (its filters are in
                            // this subscribe) or after (it subscribes them itself).
                            Some(tenants) => tenants
                                .connect(client, |filters| {
                                    subscribe_in_chunks(client, filters, &self.endpoint, &self.span)
                                })
                                .into(),
                            None if !session_present || first => self.subscribe(client).into(),
                            // The broker kept the session, but a shared subscription may not
                            // have survived a restart of it (Mosquitto 2.0.11 restores none
                            // from its persistence file): they are made again, or nothing would
                            // be read. On MQTT 3.1.1 the broker may send the retained messages
                            // they match once more (at least once allows it); on 5 they ask
                            // for retained messages only when new. Plain subscriptions are
                            // left as the session kept them.
                            None => self.subscribe_shared(client).into(),
                        };
                        pending_subacks = subscribed.len();
                        // What only relays that have left read: after the subscribe above, so
                        // that a filter folded into a wider one that goes is never uncovered.
                        forgetting =
                            unsubscribe_each(client, &self.peers.take_leftover(), &self.span);
                        if tenants.is_none() {
                            forgetting += self.forget_removed(client, session_present);
                            self.peers.connected(client);
                        }
                        if pending_subacks == 0 {
                            self.peers.state(&ctx, side, SideState::Connected, None);
                        }
                    }
                    Polled::Publish(message) => {
                        let at = *read_at.get_or_insert_with(Instant::now);
                        self.routing.route(&ctx, client, message, at);
                    }
                    Polled::PubAck {
                        tenant,
                        pkid,
                        refused,
                    } => {
                        progress.push(Progress::Acked {
                            tenant,
                            pkid,
                            refused,
                        });
                    }
                    Polled::Sent { tenant, pkid } => progress.push(Progress::Sent { tenant, pkid }),
                    Polled::SubAck { results } => {
                        // After this connection's own subscribe: the SUBACKs of relays that
                        // joined the shared connection since, told to each one alone.
                        if pending_subacks == 0
                            && let Some(tenants) = &tenants
                            && tenants.joined_suback(side, &results, &self.span)
                        {
                            continue;
                        }
                        // A SUBACK no subscribe is known for names no filters.
                        let filters = if pending_subacks > 0 {
                            subscribed.pop_front()
                        } else {
                            None
                        };
                        let refused: Vec<(Option<String>, String)> = results
                            .into_iter()
                            .enumerate()
                            .filter_map(|(i, code)| {
                                let filter = filters.as_ref().and_then(|f| f.get(i).cloned());
                                Some((filter, code?))
                            })
                            .collect();
                        if !refused.is_empty() {
                            tracing::warn!(parent: &self.span, refused = ?refused, "{}: the broker refused subscriptions", side.as_str());
                            self.peers.subscription_refused(&ctx, side, &refused);
                        }
                        if pending_subacks > 0 {
                            refused_filters.extend(refused.into_iter().map(|(f, _)| f));
                            pending_subacks -= 1;
                            if pending_subacks == 0 {
                                self.peers
                                    .subscriptions_refused(&ctx, side, &refused_filters);
                                self.peers.state(&ctx, side, SideState::Connected, None);
                            }
                        }
                    }
                    Polled::UnsubAck if forgetting > 0 => {
                        // A broker answers a connection's UNSUBSCRIBEs in order.
                        forgetting -= 1;
                        if forgetting == 0 {
                            tracing::info!(
                                parent: &self.span,
                                "the session no longer reads what no relay of it reads any more"
                            );
                            self.endpoint.unsubscribe.clear();
                        }
                    }
                    Polled::UnsubAck => {
                        if let Some(n) = unsubscribing.as_mut()
                            && *n > 0
                        {
                            *n -= 1;
                            if *n == 0 {
                                tracing::info!(parent: &self.span, "left the shared subscriptions");
                                let _ = self.retired.send(());
                            }
                        }
                    }
                    Polled::Disconnect(reason) => {
                        tracing::warn!(parent: &self.span, %reason, "the broker is disconnecting");
                        told = Some(reason);
                    }
                    Polled::Other => {}
                }
            }
            if !progress.is_empty() {
                self.peers.progress(std::mem::take(&mut progress));
            }
        }
    }

    /// What is due without waiting: stop, renewal (at `deadline`) or, if `may_retire`, leaving
    /// the shared subscriptions.
    fn due(&self, deadline: tokio::time::Instant, may_retire: bool) -> Option<Woke> {
        if *self.stop.borrow() {
            Some(Woke::Stop)
        } else if tokio::time::Instant::now() >= deadline {
            Some(Woke::Renew)
        } else if may_retire && *self.retire.borrow() {
            Some(Woke::Retire)
        } else {
            None
        }
    }

    /// Unsubscribes the shared subscriptions this side reads, so that the broker hands their
    /// messages to the group's other members from now on; returns how many UNSUBACKs to expect.
    fn leave_shared_subscriptions(&self, client: &Client) -> usize {
        let mut shared: Vec<String> = self
            .ctx
            .config
            .reading(self.side)
            .filter(|r| r.share.is_some())
            .map(|r| r.subscription())
            .collect();
        shared.sort();
        shared.dedup();
        unsubscribe_each(client, &shared, &self.span)
    }

    /// Unsubscribes what a previous relay subscribed and this one does not
    /// (`Endpoint::unsubscribe`) when the broker kept the session; returns how many UNSUBACKs
    /// to expect. A new session holds none of it: nothing is left to do.
    fn forget_removed(&mut self, client: &Client, session_present: bool) -> usize {
        if !session_present {
            self.endpoint.unsubscribe.clear();
            return 0;
        }
        unsubscribe_each(client, &self.endpoint.unsubscribe, &self.span)
    }

    /// Subscribes the filters this side reads (at most `filters_per_subscribe` per SUBSCRIBE)
    /// and returns how many SUBACKs to expect.
    fn subscribe(&self, client: &Client) -> Vec<Vec<String>> {
        let filters = self.routing.subscriptions();
        subscribe_in_chunks(client, &filters, &self.endpoint, &self.span)
    }

    /// [`Connection::subscribe`] for the shared subscriptions (`$share/...`) alone.
    fn subscribe_shared(&self, client: &Client) -> Vec<Vec<String>> {
        let mut filters = self.routing.subscriptions();
        filters.retain(|(f, _)| f.starts_with("$share/"));
        subscribe_in_chunks(client, &filters, &self.endpoint, &self.span)
    }
}

/// Unsubscribes each of `filters`; returns how many UNSUBSCRIBEs were sent (UNSUBACKs due).
fn unsubscribe_each(client: &Client, filters: &[String], span: &tracing::Span) -> usize {
    filters
        .iter()
        .filter(|f| match client.try_unsubscribe(f) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(parent: span, error = %e, "unsubscribe request failed");
                false
            }
        })
        .count()
}

/// Subscribes `filters`, at most `endpoint.filters_per_subscribe` per SUBSCRIBE; returns the
/// filters of each SUBSCRIBE sent, in order: one SUBACK is due for each.
pub(super) fn subscribe_in_chunks(
    client: &Client,
    filters: &[(String, QoS)],
    endpoint: &Endpoint,
    span: &tracing::Span,
) -> Vec<Vec<String>> {
    if filters.is_empty() {
        return Vec::new();
    }
    let chunk = endpoint
        .filters_per_subscribe
        .unwrap_or(filters.len())
        .max(1);
    let mut sent = Vec::new();
    for group in filters.chunks(chunk) {
        match client.try_subscribe_many(group) {
            Ok(()) => sent.push(group.iter().map(|(f, _)| f.clone()).collect()),
            Err(e) => tracing::warn!(parent: span, error = %e, "subscribe request failed"),
        }
    }
    sent
}
