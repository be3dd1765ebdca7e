//! MQTT 3.1.1 and MQTT 5 behind one face: rumqttc's two clients and event loops, the messages
//! they read, and the events the relay acts on. The rest of the relay does not know which
//! version a side speaks.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::v5::mqttbytes::v5 as v5p;
use rumqttc::{
    ConnectionError, Event, Incoming, MqttOptions, Outgoing, QoS, Request, StateError,
    SubscribeReasonCode,
};
use std::sync::Arc;

use tokio::time::Sleep;

use super::queue;
pub use super::wire::Topic;
use super::wire::{Out, PublishOut, Read, Wire};

/// What MQTT 5 adds to a message and the relay carries to a side that speaks 5. Topic aliases
/// and subscription identifiers belong to one connection and are not carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    /// Seconds the message lives, from when it was read.
    pub message_expiry_interval: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

impl Properties {
    fn from_v5(p: v5p::PublishProperties) -> Option<Self> {
        let props = Self {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            content_type: p.content_type,
        };
        (props != Self::default()).then_some(props)
    }

    /// The properties to publish `waited` after the message was read, the expiry reduced by
    /// that time (to at least 1 second: a message that expired while waiting for a reconnect
    /// is dropped when it is read, not once it is queued).
    pub fn aged(&self, waited: Duration) -> v5p::PublishProperties {
        let waited = u32::try_from(waited.as_secs()).unwrap_or(u32::MAX);
        v5p::PublishProperties {
            payload_format_indicator: self.payload_format_indicator,
            message_expiry_interval: self
                .message_expiry_interval
                .map(|secs| secs.saturating_sub(waited).max(1)),
            topic_alias: None,
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone(),
            user_properties: self.user_properties.clone(),
            subscription_identifiers: Vec::new(),
            content_type: self.content_type.clone(),
        }
    }

    /// Whether the message's life is over `waited` after it was read.
    pub fn expired(&self, waited: Duration) -> bool {
        self.message_expiry_interval
            .is_some_and(|secs| waited.as_secs() >= u64::from(secs))
    }
}

/// A message as handed to a connection.
pub struct ToSend {
    /// Shared with the relay's copy of the message, kept until the broker acknowledges it.
    pub topic: Topic,
    pub qos: QoS,
    pub retain: bool,
    pub payload: Bytes,
    /// MQTT 5 only; sent to a broker that speaks 5.
    pub properties: Option<std::sync::Arc<Properties>>,
    /// When it was read, to age the properties' message expiry.
    pub read_at: std::time::Instant,
}

/// A message as read from a broker.
pub struct Message {
    pub topic: Topic,
    pub pkid: u16,
    pub qos: QoS,
    pub retain: bool,
    pub payload: Bytes,
    /// MQTT 5 only.
    pub properties: Option<Properties>,
}

/// What one poll of a connection brought.
pub enum Polled {
    ConnAck {
        session_present: bool,
    },
    Publish(Message),
    /// `refused`: the broker's reason code when it refused the message (MQTT 5).
    PubAck {
        tenant: Tenant,
        pkid: u16,
        refused: Option<String>,
    },
    /// The SUBSCRIBE's filters in order: `None` where granted, the reason code where refused.
    SubAck {
        results: Vec<Option<String>>,
    },
    /// The broker acknowledged an UNSUBSCRIBE.
    UnsubAck,
    /// A publish with this packet id was written to the socket, for this tenant.
    Sent {
        tenant: Tenant,
        pkid: u16,
    },
    /// The broker is closing the connection, with this reason (MQTT 5).
    Disconnect(String),
    Other,
}

/// Why a connection ended.
pub struct Failure {
    pub error: ConnectionFailure,
    /// The broker sent a packet over the read limit, of this remaining length.
    pub oversized: Option<usize>,
}

/// The client library's error that ended a connection, of either version.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionFailure {
    #[error("{}", v4_text(.0))]
    V4(#[source] Box<ConnectionError>),
    #[error("{}", v5_text(.0))]
    V5(#[source] Box<rumqttc::v5::ConnectionError>),
}

impl ConnectionFailure {
    /// The HTTP status that refused the WebSocket handshake, if that is what failed.
    pub fn http_status(&self) -> Option<u16> {
        let refused = |e: &tungstenite::Error| match e {
            tungstenite::Error::Http(response) => Some(response.status().as_u16()),
            _ => None,
        };
        match self {
            ConnectionFailure::V4(e) => match e.as_ref() {
                ConnectionError::Websocket(e) => refused(e),
                _ => None,
            },
            ConnectionFailure::V5(e) => match e.as_ref() {
                rumqttc::v5::ConnectionError::Websocket(e) => refused(e),
                _ => None,
            },
        }
    }
}

fn v4_text(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("connection refused: {code:?}"),
        other => other.to_string(),
    }
}

fn v5_text(e: &rumqttc::v5::ConnectionError) -> String {
    match e {
        rumqttc::v5::ConnectionError::ConnectionRefused(code) => {
            format!("connection refused: {code:?}")
        }
        other => other.to_string(),
    }
}

/// A request could not be handed to its connection (it never waits, so nothing was sent).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the connection is closed")]
    Closed,
    #[error("no filters to subscribe")]
    NoFilters,
    #[error("{0}")]
    V5(#[source] Box<rumqttc::v5::ClientError>),
}

/// A client of either version.
#[derive(Clone)]
pub enum Client {
    V4(V4Client),
    V5(rumqttc::v5::AsyncClient),
}

/// Who a publish on a connection belongs to: always 0 on a connection of one relay; on a
/// connection that several relays share (see `relay::shared`), the relay it was published for,
/// so that its progress goes back to that relay's publisher.
pub type Tenant = u32;

/// The requests of a 3.1.1 connection, to its [`Lean`] loop, on behalf of one tenant. Sending
/// never waits; once the connection is gone it fails, harmlessly (the broker redelivers what
/// was not acknowledged).
#[derive(Clone)]
pub struct V4Client {
    queue: Arc<queue::Sender<(Tenant, V4Request)>>,
    tenant: Tenant,
}

/// A request to a 3.1.1 connection's loop. The relay's own publishes and acknowledgements,
/// nearly every request, are small to move through the queue and the loop; what else rumqttc's
/// session state handles (subscriptions, disconnecting) is boxed.
#[derive(Debug)]
pub enum V4Request {
    Publish(PublishOut),
    PubAck(u16),
    Other(Box<Request>),
}

impl V4Client {
    fn send(&self, request: V4Request) -> Result<(), RequestError> {
        self.queue
            .send((self.tenant, request))
            .map_err(|_| RequestError::Closed)
    }
}

/// What a 3.1.1 connection's loop reports, in order: the relay's messages read, acknowledged
/// and written, small to move; anything else as rumqttc reports it (boxed: rare).
pub enum V4Event {
    Publish(super::wire::InPublish),
    PubAck(u16),
    /// A publish with this packet id (0: QoS 0) was written.
    Sent(u16),
    Other(Box<Event>),
}

/// Moves what rumqttc's session state reported into the loop's events, in order (after every
/// call into it, failed or not, so that nothing it reported stays behind for a later round).
fn drain_state(state: &mut rumqttc::MqttState, events: &mut VecDeque<V4Event>) {
    events.extend(state.events.drain(..).map(|e| V4Event::Other(Box::new(e))));
}

/// An event loop of either version.
// The 3.1.1 loop stays unboxed: it is the common case, polled for every packet.
#[allow(clippy::large_enum_variant)]
pub enum EventLoop {
    V4(Lean),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Packets read in one round, at most (rumqttc reads 10).
const READ_BATCH: usize = 64;

/// Hands one packet read to the session state; returns what to write in reply. A QoS 0 or 1
/// publish needs nothing from the state under manual acknowledgement (the relay acknowledges
/// once the message is delivered), so it goes straight to the events, not through rumqttc's
/// handler, which copies every incoming packet and reads the clock twice.
fn incoming(
    state: &mut rumqttc::MqttState,
    events: &mut VecDeque<V4Event>,
    packet: Read,
) -> Result<Option<Out>, StateError> {
    match packet {
        Read::Publish(p) => {
            events.push_back(V4Event::Publish(p));
            Ok(None)
        }
        // The loop keeps the publishes in flight itself ([`Owners`]); an acknowledgement of an
        // id not in flight matches nothing there, nor in the publisher's outbox.
        Read::PubAck(pkid) => {
            events.push_back(V4Event::PubAck(pkid));
            Ok(None)
        }
        Read::Packet(other) => {
            let reply = state.handle_incoming_packet(*other);
            drain_state(state, events);
            Ok(reply?.map(|reply| Out::Packet(Box::new(reply))))
        }
    }
}

/// The packet to write for a request. Publishes and acknowledgements skip rumqttc's state: the
/// loop keeps the publishes in flight itself ([`Owners`], and the relay's outbox sends again
/// what a lost connection did not deliver), and an acknowledgement needs no state. rumqttc's
/// handler would copy every publish to keep it for retransmission and read the clock for
/// every packet.
fn outgoing(
    state: &mut rumqttc::MqttState,
    events: &mut VecDeque<V4Event>,
    request: V4Request,
) -> Result<Option<Out>, StateError> {
    match request {
        V4Request::Publish(p) => {
            events.push_back(V4Event::Sent(p.pkid));
            Ok(Some(Out::Publish(p)))
        }
        V4Request::PubAck(pkid) => Ok(Some(Out::PubAck(pkid))),
        V4Request::Other(other) => {
            let packet = state.handle_outgoing_packet(*other);
            drain_state(state, events);
            Ok(packet?.map(|packet| Out::Packet(Box::new(packet))))
        }
    }
}

/// The 3.1.1 event loop: rumqttc keeps the session state for pings, subscriptions and QoS 2,
/// and its codec reads and writes the packets; over TCP and TLS this loop connects and moves
/// the bytes itself ([`Wire`]), over a WebSocket rumqttc does. This loop drives the packets,
/// and keeps the publishes in flight itself ([`Owners`]). Each round reads
/// what the socket holds (up to [`READ_BATCH`] packets) or takes every queued request, writes
/// all their packets into the write buffer and flushes once. rumqttc's own loop writes and flushes once per
/// request and, on every poll, registers and drops a waiter on its request channel and arms a
/// timer; under callgrind that was most of the relay's cost per message.
pub struct Lean {
    inner: rumqttc::EventLoop,
    /// A TCP or TLS connection's stream, read and written by this loop with its own buffers
    /// ([`Wire`]); `None` for a WebSocket, which uses rumqttc's stream.
    wire: Option<Wire>,
    /// The largest packet written (over this loop's own wire).
    max_outgoing: usize,
    requests: queue::Receiver<(Tenant, V4Request)>,
    /// Requests taken from the queue and not yet handled, the next one last.
    batch: Vec<(Tenant, V4Request)>,
    /// Publishes waiting for a free packet id (in flight at the limit). Everything published
    /// after them waits too, to keep order.
    held: VecDeque<(Tenant, V4Request)>,
    /// Packet ids in flight and whose they are.
    owners: Owners,
    /// What the rounds reported and the caller has not taken yet.
    events: VecDeque<V4Event>,
    keepalive: Option<Pin<Box<Sleep>>>,
    flush_timeout: Duration,
    /// The error that ended the connection, reported once the events before it are handed over.
    failed: Option<ConnectionError>,
    /// How long to wait before reading again after a read that emptied the socket (see
    /// [`next_read`]).
    linger: Duration,
    /// The next read starts no earlier than this.
    read_after: Option<tokio::time::Instant>,
}

/// When the next read may start, after a round that read `read` packets: at once when it
/// stopped at [`READ_BATCH`] (more is waiting) or without a linger; otherwise `linger` after
/// `now`, so that a steady stream is read in larger batches (fewer wake-ups, reads and TCP
/// acknowledgements per message) at the cost of at most `linger` of added latency. Writes are
/// never held back.
fn next_read(
    linger: Duration,
    read: usize,
    now: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    (read < READ_BATCH && !linger.is_zero()).then(|| now + linger)
}

impl Lean {
    /// A loop and its client (tenant 0) for one connection; `linger`: see [`next_read`];
    /// `max_outgoing`: the largest packet written.
    pub fn new(options: MqttOptions, linger: Duration, max_outgoing: usize) -> (V4Client, Lean) {
        let (client, requests) = queue::queue();
        // rumqttc's own request queue is never read: requests come through `requests`.
        let mut inner = rumqttc::EventLoop::new(options, 1);
        // rumqttc reserves room for 100 events up front (about 14 KB); the loop drains them
        // every round, so a few slots are enough (an idle bridge holds two connections).
        inner.state.events = VecDeque::new();
        let flush_timeout = Duration::from_secs(inner.network_options().connection_timeout());
        (
            V4Client {
                queue: Arc::new(client),
                tenant: 0,
            },
            Lean {
                inner,
                wire: None,
                max_outgoing,
                requests,
                batch: Vec::new(),
                held: VecDeque::new(),
                owners: Owners::default(),
                events: VecDeque::new(),
                keepalive: None,
                flush_timeout,
                failed: None,
                linger,
                read_after: None,
            },
        )
    }

    /// Waits for events and moves them all to `out` (which the caller has emptied): connects
    /// first (CONNACK is the first event), then runs rounds until one produced events.
    pub async fn poll_into(&mut self, out: &mut VecDeque<V4Event>) -> Result<(), ConnectionError> {
        if self.wire.is_none() && self.inner.network.is_none() {
            // Boxed: connecting (TLS and WebSocket handshakes) is the largest state of
            // rumqttc's poll future and runs once per connection; inline it would size every
            // connection's task for it.
            // Over TCP and TLS this loop connects itself; over a WebSocket rumqttc does.
            let connected = match super::wire::layer(&self.inner.mqtt_options.transport()) {
                Some(layer) => {
                    let connecting = Wire::connect(
                        &self.inner.mqtt_options,
                        &layer,
                        self.max_outgoing,
                        self.flush_timeout,
                    );
                    let (wire, ack) = Box::pin(connecting).await?;
                    self.wire = Some(wire);
                    Event::Incoming(Incoming::ConnAck(ack))
                }
                None => Box::pin(self.inner.poll()).await?,
            };
            let keep_alive = self.inner.mqtt_options.keep_alive();
            if !keep_alive.is_zero() {
                self.keepalive = Some(Box::pin(tokio::time::sleep(keep_alive)));
            }
            out.push_back(V4Event::Other(Box::new(connected)));
            return Ok(());
        }
        loop {
            let events = &mut self.events;
            if !events.is_empty() {
                if out.is_empty() {
                    std::mem::swap(events, out);
                } else {
                    out.append(events);
                }
                return Ok(());
            }
            if let Some(failed) = self.failed.take() {
                return Err(failed);
            }
            if let Err(e) = self.round().await {
                if self.events.is_empty() {
                    return Err(e);
                }
                // What the round read before it failed (say, messages before an oversized
                // one) is handed over first: on a clean session it would otherwise be lost.
                self.failed = Some(e);
            }
        }
    }

    /// Ends the connection cleanly: writes DISCONNECT after everything queued before it and
    /// waits (at most `limit`) for the broker to close its side. A broker closes only once it
    /// has read all of it, so a connection made next with the same client id is not taken for a
    /// second copy of this one (a takeover). What arrives meanwhile is not acknowledged: the
    /// broker delivers it again to the next session.
    pub async fn close(&mut self, limit: Duration) {
        macro_rules! close_on {
            ($network:expr) => {{
                let network = $network;
                let _ = tokio::time::timeout(limit, async {
                    if network.write(rumqttc::Packet::Disconnect).await.is_ok()
                        && network.flush().await.is_ok()
                    {
                        while network.read().await.is_ok() {}
                    }
                })
                .await;
            }};
        }
        if let Some(wire) = self.wire.as_mut() {
            close_on!(wire);
        } else if let Some(network) = self.inner.network.as_mut() {
            close_on!(network);
        }
        self.wire = None;
        self.inner.network = None;
    }

    /// One round: waits for packets to read, requests to write or the keep-alive, handles all
    /// that is ready, then flushes once.
    async fn round(&mut self) -> Result<(), ConnectionError> {
        let Lean {
            inner,
            wire,
            max_outgoing: _,
            requests,
            batch,
            held,
            owners,
            events,
            keepalive,
            flush_timeout,
            failed: _,
            linger,
            read_after,
        } = self;
        let state = &mut inner.state;
        let max_inflight = inner.mqtt_options.inflight();
        let keep_alive = inner.mqtt_options.keep_alive();
        // The same round over either stream: this loop's own wire (TCP, TLS) or rumqttc's
        // (WebSocket). rumqttc's stream type cannot be named outside it, so the two are
        // not behind one trait.
        // Queues a packet on either stream: this loop's wire writes the relay's publishes and
        // acknowledgements as they are; rumqttc's stream takes its own packet types.
        macro_rules! put_on_wire {
            ($network:expr, $out:expr) => {
                $network.put($out).await?
            };
        }
        macro_rules! put_on_rumqttc {
            ($network:expr, $out:expr) => {
                $network.write($out.into_packet()).await?
            };
        }
        macro_rules! read_on_wire {
            ($network:expr) => {
                $network.read()
            };
        }
        macro_rules! read_on_rumqttc {
            ($network:expr) => {
                $network.read().map(|r| r.map(Read::from))
            };
        }
        macro_rules! round_on {
            ($network:expr, $put:ident, $read:ident) => {{
                let network = $network;
                if !held.is_empty() && owners.has_room(max_inflight) {
                    while owners.has_room(max_inflight)
                        && let Some((tenant, mut request)) = held.pop_front()
                    {
                        owners.assign(tenant, &mut request, max_inflight);
                        if let Some(out) = outgoing(state, events, request)? {
                            $put!(network, out);
                        }
                    }
                } else {
                    if batch.is_empty() {
                        let ping = async {
                            match keepalive.as_mut() {
                                Some(k) => k.as_mut().await,
                                None => std::future::pending().await,
                            }
                        };
                        // After a read that emptied the socket, with a linger: not before its end
                        // (kept across rounds that only write).
                        let wait = read_after.filter(|at| *at > tokio::time::Instant::now());
                        if wait.is_none() {
                            *read_after = None;
                        }
                        let read = async {
                            if let Some(at) = wait {
                                tokio::time::sleep_until(at).await;
                            }
                            $read!(network).await
                        };
                        // Not biased: under load every branch is ready, and none may starve the others
                        // (unread PINGRESPs would end the connection).
                        tokio::select! {
                            first = read => {
                                // What the socket already holds, up to READ_BATCH packets, without
                                // waiting.
                                let mut packet = first?;
                                let mut read = 1;
                                loop {
                                    if let Some(reply) = incoming(state, events, packet)? {
                                        $put!(network, reply);
                                    }
                                    if read == READ_BATCH {
                                        break;
                                    }
                                    match $read!(network).now_or_never() {
                                        Some(next) => packet = next?,
                                        None => break,
                                    }
                                    read += 1;
                                }
                                if !linger.is_zero() {
                                    *read_after = next_read(*linger, read, tokio::time::Instant::now());
                                }
                            }
                            open = requests.take(batch) => {
                                if !open {
                                    return Err(ConnectionError::RequestsDone);
                                }
                                // Taken from the back, so that requests not yet handled when this
                                // future is dropped stay for the next round, in order.
                                batch.reverse();
                            }
                            () = ping => {
                                if let Some(k) = keepalive.as_mut() {
                                    let next = tokio::time::Instant::now() + keep_alive;
                                    k.as_mut().reset(next);
                                }
                                let ping = state.handle_outgoing_packet(Request::PingReq(rumqttc::PingReq));
                                drain_state(state, events);
                                if let Some(packet) = ping? {
                                    $put!(network, Out::Packet(Box::new(packet)));
                                }
                            }
                        }
                    }
                    while let Some((tenant, mut request)) = batch.pop() {
                        let publish = matches!(request, V4Request::Publish(_));
                        if publish && (!held.is_empty() || !owners.has_room(max_inflight)) {
                            held.push_back((tenant, request));
                            continue;
                        }
                        owners.assign(tenant, &mut request, max_inflight);
                        if let Some(out) = outgoing(state, events, request)? {
                            $put!(network, out);
                        }
                    }
                }
                // One flush for the round; a timer only if the socket cannot take it at once.
                let flush = network.flush();
                tokio::pin!(flush);
                let flushed = match flush.as_mut().now_or_never() {
                    Some(done) => done,
                    None => tokio::time::timeout(*flush_timeout, flush)
                        .await
                        .map_err(|_| ConnectionError::FlushTimeout)?,
                };
                flushed?;
                Ok(())
            }};
        }
        match wire.as_mut() {
            Some(wire) => round_on!(wire, put_on_wire, read_on_wire),
            None => match inner.network.as_mut() {
                Some(network) => round_on!(network, put_on_rumqttc, read_on_rumqttc),
                None => Ok(()),
            },
        }
    }
}

/// The packet ids of one 3.1.1 connection's publishes in flight, and whose they are. The loop
/// hands out only ids that are free (no packet-id collision, and at most the in-flight limit)
/// and traces each acknowledgement to its tenant.
#[derive(Default)]
struct Owners {
    /// By packet id: the tenant and the publish's place in write order.
    slots: Vec<Option<(Tenant, u64)>>,
    /// Tenants of the QoS 0 publishes written and not yet reported to their publishers.
    qos0: VecDeque<Tenant>,
    last: u16,
    inflight: u16,
    written: u64,
}

impl Owners {
    /// Whether a QoS 1 publish can have a packet id now.
    fn has_room(&self, max_inflight: u16) -> bool {
        self.inflight < max_inflight
    }

    /// Gives a publish of `tenant` a free packet id (QoS 1) or its place in line (QoS 0).
    /// Called only with room (see [`Owners::has_room`]); other requests are left as they are.
    /// In place: moving a request in and out costs two copies of it.
    #[inline]
    fn assign(&mut self, tenant: Tenant, request: &mut V4Request, max_inflight: u16) {
        if let V4Request::Publish(publish) = request {
            self.assign_publish(tenant, publish, max_inflight);
        }
    }

    fn assign_publish(&mut self, tenant: Tenant, publish: &mut PublishOut, max_inflight: u16) {
        if publish.qos == QoS::AtMostOnce {
            self.qos0.push_back(tenant);
            return;
        }
        let max = max_inflight.max(1);
        if self.slots.len() <= usize::from(max) {
            self.slots.resize(usize::from(max) + 1, None);
        }
        // The next free id after the last one handed out (ids are acknowledged mostly in
        // order, so this is usually the first one looked at).
        let mut pkid = self.last;
        for _ in 0..max {
            pkid = if pkid >= max { 1 } else { pkid + 1 };
            if self.slots[usize::from(pkid)].is_none() {
                break;
            }
        }
        self.written += 1;
        self.slots[usize::from(pkid)] = Some((tenant, self.written));
        self.last = pkid;
        self.inflight += 1;
        publish.pkid = pkid;
    }

    /// The tenant of a publish the loop reported written.
    fn sent(&mut self, pkid: u16) -> Tenant {
        if pkid == 0 {
            return self.qos0.pop_front().unwrap_or(0);
        }
        self.slots
            .get(usize::from(pkid))
            .copied()
            .flatten()
            .map_or(0, |(tenant, _)| tenant)
    }

    /// The tenant of an acknowledged publish; its packet id is free again.
    fn acked(&mut self, pkid: u16) -> Tenant {
        match self.slots.get_mut(usize::from(pkid)).and_then(Option::take) {
            Some((tenant, _)) => {
                self.inflight -= 1;
                tenant
            }
            None => 0,
        }
    }

    /// The tenant of the oldest publish written and not acknowledged.
    fn oldest(&self) -> Option<Tenant> {
        self.slots
            .iter()
            .flatten()
            .min_by_key(|(_, written)| *written)
            .map(|(tenant, _)| *tenant)
    }
}

fn to_v5(qos: QoS) -> V5QoS {
    match qos {
        QoS::AtMostOnce => V5QoS::AtMostOnce,
        QoS::AtLeastOnce => V5QoS::AtLeastOnce,
        QoS::ExactlyOnce => V5QoS::ExactlyOnce,
    }
}

fn from_v5(qos: V5QoS) -> QoS {
    match qos {
        V5QoS::AtMostOnce => QoS::AtMostOnce,
        V5QoS::AtLeastOnce => QoS::AtLeastOnce,
        V5QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

impl Client {
    /// A 3.1.1 client with no connection behind it, and what it is asked to send (for tests).
    #[cfg(test)]
    pub fn detached() -> (Client, queue::Receiver<(Tenant, V4Request)>) {
        let (tx, rx) = queue::queue();
        let client = V4Client {
            queue: Arc::new(tx),
            tenant: 0,
        };
        (Client::V4(client), rx)
    }

    /// The same connection, publishing on behalf of `tenant` (3.1.1; an MQTT 5 connection is
    /// never shared and stays as it is).
    pub fn for_tenant(&self, tenant: Tenant) -> Client {
        match self {
            Client::V4(c) => Client::V4(V4Client {
                queue: c.queue.clone(),
                tenant,
            }),
            Client::V5(c) => Client::V5(c.clone()),
        }
    }

    /// Acknowledges a QoS 1 message without waiting. The relay sizes the request queue to hold
    /// an acknowledgement for every packet id, so this fails only when the connection is gone
    /// (and then the broker sends the message again).
    pub fn try_ack(&self, pkid: u16) {
        match self {
            Client::V4(c) => {
                let _ = c.send(V4Request::PubAck(pkid));
            }
            Client::V5(c) => {
                let mut ack = v5p::Publish::new("", V5QoS::AtLeastOnce, Vec::new(), None);
                ack.pkid = pkid;
                let _ = c.try_ack(&ack);
            }
        }
    }

    /// Queues each message of `batch` in turn. Properties reach a broker that speaks 5 only,
    /// their expiry reduced by the time since the message was read. The version is matched
    /// once per batch, and each publish awaits the client's own future.
    pub async fn publish_all(&self, batch: impl Iterator<Item = ToSend>) {
        match self {
            Client::V4(c) => {
                for ToSend {
                    topic,
                    qos,
                    retain,
                    payload,
                    ..
                } in batch
                {
                    let _ = c.send(V4Request::Publish(PublishOut {
                        topic,
                        payload,
                        qos,
                        retain,
                        pkid: 0,
                    }));
                }
            }
            Client::V5(c) => {
                for ToSend {
                    topic,
                    qos,
                    retain,
                    payload,
                    properties,
                    read_at,
                } in batch
                {
                    let qos = to_v5(qos);
                    let topic = String::from(topic.as_str());
                    let _ = match properties {
                        Some(p) => {
                            let p = p.aged(read_at.elapsed());
                            c.publish_bytes_with_properties(topic, qos, retain, payload, p)
                                .await
                        }
                        None => c.publish_bytes(topic, qos, retain, payload).await,
                    };
                }
            }
        }
    }

    /// Subscribes filters in one request (never waits). MQTT 5 subscriptions are `noLocal`: the
    /// relay never reads back what it published on the same connection (shared subscriptions
    /// excepted, where MQTT 5 forbids it).
    pub fn try_subscribe_many(&self, filters: &[(String, QoS)]) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => {
                if filters.is_empty() {
                    return Err(RequestError::NoFilters);
                }
                let subscribe = rumqttc::Subscribe::new_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q)),
                );
                c.send(V4Request::Other(Box::new(Request::Subscribe(subscribe))))
            }
            Client::V5(c) => c
                .try_subscribe_many(filters.iter().map(|(f, q)| {
                    let mut filter = v5p::Filter::new(f.clone(), to_v5(*q));
                    filter.nolocal = !f.starts_with("$share/");
                    // A subscription made again on a kept session (see `subscribe_shared`)
                    // brings no retained messages twice.
                    filter.retain_forward_rule = v5p::RetainForwardRule::OnNewSubscribe;
                    filter
                }))
                .map_err(|e| RequestError::V5(Box::new(e))),
        }
    }

    /// Unsubscribes one filter (never waits).
    pub fn try_unsubscribe(&self, filter: &str) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c.send(V4Request::Other(Box::new(Request::Unsubscribe(
                rumqttc::Unsubscribe::new(filter),
            )))),
            Client::V5(c) => c
                .try_unsubscribe(filter)
                .map_err(|e| RequestError::V5(Box::new(e))),
        }
    }

    pub fn try_disconnect(&self) {
        match self {
            Client::V4(c) => {
                let _ = c.send(V4Request::Other(Box::new(Request::Disconnect(
                    rumqttc::Disconnect,
                ))));
            }
            Client::V5(c) => {
                let _ = c.try_disconnect();
            }
        }
    }
}

/// One version's event loop as the connection drives it: waits for events and moves all that
/// are ready into the caller's queue, which the connection then handles in one go (one wake-up,
/// one `select!` and one report to the publisher per batch, not per packet).
pub trait Link {
    type Loop;
    type Raw;
    fn poll<'a>(
        l: &'a mut Self::Loop,
        out: &'a mut VecDeque<Self::Raw>,
    ) -> impl Future<Output = Result<(), Failure>> + Send + 'a;
    /// What one event means to the relay. Events are converted in the order they were
    /// polled, each before the next poll.
    fn convert(l: &mut Self::Loop, raw: Self::Raw) -> Polled;
    /// The tenant of the oldest publish written on the connection and not acknowledged (a
    /// broker that refuses a publish by closing the connection refuses that one).
    fn suspect(l: &Self::Loop) -> Option<Tenant>;
    /// Ends the connection, telling the broker (DISCONNECT) where the version allows.
    fn close<'a>(l: &'a mut Self::Loop, client: &'a Client)
    -> impl Future<Output = ()> + Send + 'a;
}

/// How long a connection being closed waits for the broker to close its side.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// MQTT 3.1.1.
pub struct V4;
/// MQTT 5.
pub struct V5;

impl Link for V4 {
    type Loop = Lean;
    type Raw = V4Event;
    #[inline]
    fn poll<'a>(
        l: &'a mut Lean,
        out: &'a mut VecDeque<V4Event>,
    ) -> impl Future<Output = Result<(), Failure>> + Send + 'a {
        l.poll_into(out).map(|r| r.map_err(v4_failure))
    }
    /// Each publish's progress is traced to its tenant here, in the order the loop reported
    /// it (a PUBACK frees its packet id before the next round hands out ids).
    #[inline]
    fn convert(l: &mut Lean, event: V4Event) -> Polled {
        match event {
            V4Event::Publish(p) => Polled::Publish(Message {
                topic: p.topic,
                pkid: p.pkid,
                qos: p.qos,
                retain: p.retain,
                payload: p.payload,
                properties: None,
            }),
            V4Event::PubAck(pkid) => Polled::PubAck {
                tenant: l.owners.acked(pkid),
                pkid,
                refused: None,
            },
            V4Event::Sent(pkid) => Polled::Sent {
                tenant: l.owners.sent(pkid),
                pkid,
            },
            V4Event::Other(event) => from_v4_event(*event),
        }
    }
    fn suspect(l: &Lean) -> Option<Tenant> {
        l.owners.oldest()
    }
    fn close<'a>(l: &'a mut Lean, _client: &'a Client) -> impl Future<Output = ()> + Send + 'a {
        l.close(CLOSE_WAIT)
    }
}

impl Link for V5 {
    type Loop = rumqttc::v5::EventLoop;
    type Raw = rumqttc::v5::Event;
    #[inline]
    fn poll<'a>(
        l: &'a mut Self::Loop,
        out: &'a mut VecDeque<Self::Raw>,
    ) -> impl Future<Output = Result<(), Failure>> + Send + 'a {
        l.poll().map(|r| match r {
            Ok(event) => {
                out.push_back(event);
                Ok(())
            }
            Err(e) => Err(v5_failure(e)),
        })
    }
    #[inline]
    fn convert(_: &mut Self::Loop, raw: Self::Raw) -> Polled {
        from_v5_event(raw)
    }
    fn suspect(_: &Self::Loop) -> Option<Tenant> {
        None
    }
    /// rumqttc writes the DISCONNECT; the loop is polled until it has (or fails).
    async fn close(l: &mut Self::Loop, client: &Client) {
        client.try_disconnect();
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            loop {
                match l.poll().await {
                    Ok(rumqttc::v5::Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// What the relay makes of an event of rumqttc's (the loop reports the relay's own publishes
/// and acknowledgements as [`V4Event`]s; a QoS 2 message comes here).
fn from_v4_event(event: Event) -> Polled {
    match event {
        Event::Incoming(Incoming::ConnAck(a)) => Polled::ConnAck {
            session_present: a.session_present,
        },
        Event::Incoming(Incoming::Publish(p)) => Polled::Publish(Message {
            topic: Topic::from(p.topic),
            pkid: p.pkid,
            qos: p.qos,
            retain: p.retain,
            payload: p.payload,
            properties: None,
        }),
        Event::Incoming(Incoming::SubAck(a)) => Polled::SubAck {
            results: a
                .return_codes
                .iter()
                .map(|c| matches!(c, SubscribeReasonCode::Failure).then(|| "Failure".to_owned()))
                .collect(),
        },
        Event::Incoming(Incoming::UnsubAck(_)) => Polled::UnsubAck,
        _ => Polled::Other,
    }
}

fn v4_failure(e: ConnectionError) -> Failure {
    Failure {
        oversized: match &e {
            ConnectionError::MqttState(StateError::Deserialization(
                rumqttc::Error::PayloadSizeLimitExceeded(n),
            )) => Some(*n),
            _ => None,
        },
        error: ConnectionFailure::V4(Box::new(e)),
    }
}

fn from_v5_event(event: rumqttc::v5::Event) -> Polled {
    use rumqttc::v5::{Event as E, mqttbytes::v5::Packet as P};
    match event {
        E::Incoming(P::ConnAck(a)) => Polled::ConnAck {
            session_present: a.session_present,
        },
        E::Incoming(P::Publish(p)) => Polled::Publish(Message {
            topic: Topic::lossy(p.topic),
            pkid: p.pkid,
            qos: from_v5(p.qos),
            retain: p.retain,
            payload: p.payload,
            properties: p.properties.and_then(Properties::from_v5),
        }),
        E::Incoming(P::PubAck(a)) => Polled::PubAck {
            tenant: 0,
            pkid: a.pkid,
            refused: matches!(
                a.reason,
                v5p::PubAckReason::UnspecifiedError
                    | v5p::PubAckReason::ImplementationSpecificError
                    | v5p::PubAckReason::NotAuthorized
                    | v5p::PubAckReason::TopicNameInvalid
                    | v5p::PubAckReason::PacketIdentifierInUse
                    | v5p::PubAckReason::QuotaExceeded
                    | v5p::PubAckReason::PayloadFormatInvalid
            )
            .then(|| format!("{:?}", a.reason)),
        },
        E::Incoming(P::SubAck(a)) => Polled::SubAck {
            results: a
                .return_codes
                .iter()
                .map(|c| {
                    (!matches!(c, v5p::SubscribeReasonCode::Success(_))).then(|| format!("{c:?}"))
                })
                .collect(),
        },
        E::Incoming(P::Disconnect(d)) => Polled::Disconnect(format!("{:?}", d.reason_code)),
        E::Incoming(P::UnsubAck(_)) => Polled::UnsubAck,
        E::Outgoing(Outgoing::Publish(pkid)) => Polled::Sent { tenant: 0, pkid },
        _ => Polled::Other,
    }
}

fn v5_failure(e: rumqttc::v5::ConnectionError) -> Failure {
    Failure {
        oversized: None,
        error: ConnectionFailure::V5(Box::new(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_websocket_handshake_gives_its_http_status_and_keeps_the_error() {
        let response = http::Response::builder()
            .status(403)
            .body(None)
            .expect("a response");
        let refused = ConnectionFailure::V4(Box::new(ConnectionError::Websocket(
            tungstenite::Error::Http(response),
        )));
        assert_eq!(refused.http_status(), Some(403));
        assert!(std::error::Error::source(&refused).is_some());
        assert!(crate::error::chain(&refused).contains("403"), "{refused}");
        let other = ConnectionFailure::V4(Box::new(ConnectionError::NetworkTimeout));
        assert_eq!(other.http_status(), None);
    }

    #[test]
    fn expiry_is_reduced_by_the_wait_and_never_reaches_zero() {
        let p = Properties {
            message_expiry_interval: Some(60),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        assert_eq!(
            p.aged(Duration::from_millis(2_500)).message_expiry_interval,
            Some(58)
        );
        assert_eq!(
            p.aged(Duration::from_secs(600)).message_expiry_interval,
            Some(1)
        );
        assert_eq!(p.aged(Duration::ZERO).user_properties, p.user_properties);
        assert!(!p.expired(Duration::from_secs(59)));
        assert!(p.expired(Duration::from_secs(60)));
        assert!(!Properties::default().expired(Duration::from_secs(u64::MAX / 2)));
        assert_eq!(
            Properties::default()
                .aged(Duration::from_secs(5))
                .message_expiry_interval,
            None
        );
    }

    fn publish(qos: QoS) -> V4Request {
        V4Request::Publish(PublishOut {
            topic: "t".into(),
            payload: Bytes::new(),
            qos,
            retain: false,
            pkid: 0,
        })
    }

    /// The packet id `owners` gives a publish of `tenant` at `qos`.
    fn assigned(owners: &mut Owners, tenant: Tenant, qos: QoS, max: u16) -> u16 {
        let mut request = publish(qos);
        owners.assign(tenant, &mut request, max);
        match request {
            V4Request::Publish(p) => p.pkid,
            _ => panic!("not a publish"),
        }
    }

    #[test]
    fn packet_ids_are_free_ones_and_trace_back_to_their_tenant() {
        let mut owners = Owners::default();
        let max = 3;
        let ids: Vec<u16> = [7, 8, 7]
            .iter()
            .map(|t| assigned(&mut owners, *t, QoS::AtLeastOnce, max))
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(!owners.has_room(max));
        // QoS 0 takes no id; its tenant comes back in order.
        assert_eq!(assigned(&mut owners, 9, QoS::AtMostOnce, max), 0);
        assert_eq!(owners.sent(0), 9);
        assert_eq!((owners.sent(1), owners.sent(2)), (7, 8));
        assert_eq!(owners.oldest(), Some(7));
        // Acknowledged out of order: 2 is free again, and the next id skips 1 and 3, in flight.
        assert_eq!(owners.acked(2), 8);
        assert_eq!(owners.acked(2), 0, "acknowledged twice");
        assert!(owners.has_room(max));
        assert_eq!(assigned(&mut owners, 5, QoS::AtLeastOnce, max), 2);
        assert_eq!(owners.sent(2), 5);
        // The oldest unacknowledged is 1 (tenant 7), then 3 (7 again), then 2 (5).
        assert_eq!(owners.acked(1), 7);
        assert_eq!(owners.acked(3), 7);
        assert_eq!(owners.oldest(), Some(5));
        assert_eq!(owners.acked(2), 5);
        assert_eq!(owners.oldest(), None);
        // Other requests pass unchanged.
        let mut ack = V4Request::PubAck(4);
        owners.assign(1, &mut ack, max);
        assert!(matches!(ack, V4Request::PubAck(4)));
        assert_eq!(owners.qos0.len(), 0);
    }

    #[test]
    fn a_read_that_empties_the_socket_waits_the_linger_before_the_next() {
        let now = tokio::time::Instant::now();
        let linger = Duration::from_millis(2);
        assert_eq!(next_read(linger, 1, now), Some(now + linger));
        assert_eq!(next_read(linger, READ_BATCH - 1, now), Some(now + linger));
        // Stopped at the batch limit: more is waiting, read again at once.
        assert_eq!(next_read(linger, READ_BATCH, now), None);
        // No linger: always at once.
        assert_eq!(next_read(Duration::ZERO, 1, now), None);
    }

    #[test]
    fn empty_v5_properties_are_none() {
        assert_eq!(Properties::from_v5(v5p::PublishProperties::default()), None);
        let p = v5p::PublishProperties {
            topic_alias: Some(3),
            subscription_identifiers: vec![7],
            ..Default::default()
        };
        assert_eq!(
            Properties::from_v5(p),
            None,
            "per-connection fields are not carried"
        );
    }
}
