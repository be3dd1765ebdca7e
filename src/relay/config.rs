//! Plain relay configuration: what the controller or the `bridge` command hands the engine.

use super::status::Side;
use super::tls::TlsTrust;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::topic::{TopicFilter, TopicTemplate};
pub use crate::vocab::Secret;
use crate::vocab::{Direction, RetainHandling};

/// A URL signed for one connection attempt.
pub struct SignedUrl {
    pub url: Secret,
    /// When the credentials behind the signature expire: the relay reconnects before then.
    pub credentials_expire: Option<SystemTime>,
}

pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<SignedUrl, SignError>> + Send + 'a>>;

/// Why a connection URL could not be signed. The text never holds credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The broker's address is unknown (not configured, and discovering it failed).
    #[error("{0}")]
    Endpoint(#[source] crate::error::Source),
    /// No credentials to sign with (the provider failed or the keys cannot be loaded).
    #[error("{0}")]
    Credentials(#[source] crate::error::Source),
    /// Signing itself failed.
    #[error("{0}")]
    Signing(#[source] crate::error::Source),
}

impl SignError {
    /// Short reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SignError::Endpoint(_) => "EndpointUnknown",
            SignError::Credentials(_) => "CredentialsUnavailable",
            SignError::Signing(_) => "SigningFailed",
        }
    }
}

/// Produces a freshly signed WebSocket URL for every connection attempt (SigV4 for AWS IoT).
pub trait UrlSigner: Send + Sync {
    fn signed_url(&self) -> SignFuture<'_>;
}

/// Default message limit of an MQTT broker (EMQX's and NATS's default too).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// AWS IoT Core accepts at most this many filters in one SUBSCRIBE.
pub const AWS_IOT_FILTERS_PER_SUBSCRIBE: usize = 8;
/// AWS IoT Core's message limit (128 KB payload).
pub const AWS_IOT_MAX_MESSAGE_BYTES: usize = 128 * 1024;

/// One broker connection.
#[derive(Clone)]
pub struct Endpoint {
    /// `mqtt://`, `mqtts://`, `ws://` or `wss://` URL (unsigned; the signer replaces it).
    pub url: String,
    pub client_id: String,
    pub keep_alive: Duration,
    /// Start every connection without a session (false: persistent session).
    pub clean_session: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// How a TLS broker's certificate is checked (`mqtts://`, `wss://`).
    pub tls: TlsTrust,
    pub signer: Option<Arc<dyn UrlSigner>>,
    /// Largest message payload sent to or taken from this broker, in bytes. A message over the
    /// limit of the side it goes to (or comes from) is dropped, counted and acknowledged.
    pub max_message_bytes: usize,
    /// At most this many filters in one SUBSCRIBE (AWS IoT Core takes 8); `None`: all in one.
    pub filters_per_subscribe: Option<usize>,
    /// Messages in flight on this connection (set from the relay's window).
    pub window: usize,
    /// After a read that emptied the socket, wait this long before reading again (MQTT 3.1.1
    /// connections; zero: read at once). Trades added latency for fewer reads per message.
    pub read_linger: Duration,
    /// The MQTT version spoken to this broker.
    pub protocol: Protocol,
    /// Subscriptions that a relay before this one, with the same client id on the same broker,
    /// made and this one does not (a route removed or changed): unsubscribed when this relay
    /// finds that the broker kept the session, so that the session stops reading them. Set by
    /// [`crate::relay::RelayManager`] when it replaces a relay.
    pub unsubscribe: Vec<String>,
}

/// MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    V311,
    /// MQTT 5: message properties pass through, reason codes are reported, subscriptions are
    /// `noLocal`.
    V5,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("signed", &self.signer.is_some())
            .field("tls", &self.tls)
            .field("window", &self.window)
            .field("read_linger", &self.read_linger)
            .field("protocol", &self.protocol)
            .field("unsubscribe", &self.unsubscribe)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// A plain endpoint with defaults.
    pub fn new(url: impl Into<String>, client_id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client_id: client_id.into(),
            keep_alive: Duration::from_secs(60),
            clean_session: false,
            username: None,
            password: None,
            tls: TlsTrust::System,
            signer: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            filters_per_subscribe: None,
            window: 100,
            read_linger: Duration::ZERO,
            protocol: Protocol::V311,
            unsubscribe: Vec::new(),
        }
    }
}

/// One route, parsed.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub filter: TopicFilter,
    pub template: TopicTemplate,
    /// 0 or 1.
    pub qos: u8,
    pub retain: RetainHandling,
    pub direction: Direction,
    /// Subscribe as `$share/<share>/<filter>` (a shared subscription).
    pub share: Option<String>,
}

impl RouteConfig {
    /// What to subscribe to for this route.
    pub fn subscription(&self) -> String {
        match &self.share {
            Some(group) => format!("$share/{group}/{}", self.filter.as_str()),
            None => self.filter.as_str().to_owned(),
        }
    }
}

/// Everything a relay needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// `namespace/name`, for logs and metrics.
    pub name: String,
    pub source: Endpoint,
    pub sink: Endpoint,
    pub routes: Vec<RouteConfig>,
    /// Messages in flight per side (sent, not yet acknowledged).
    pub window: usize,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Reconnect with a newly signed URL before a connection gets this old (AWS IoT ends
    /// connections after 24 hours).
    pub max_connection_age: Duration,
    /// Reconnect this long before signing credentials expire.
    pub credential_margin: Duration,
    /// How long a stopping relay waits for in-flight messages.
    pub drain_timeout: Duration,
    /// Both sides connected, a destination that takes none of the messages waiting for it this
    /// long is reported stalled ([`crate::relay::RelayStatus::stalled`]); zero: never.
    pub stall_after: Duration,
    /// Asked before every connection attempt; a refused attempt waits and asks again. The
    /// operator refuses once its leadership has lapsed, so that a replica waking from a freeze
    /// cannot reconnect under a client id that another replica now holds.
    pub connect_permit: Option<ConnectPermit>,
    /// Retiring the relay (gone for good: [`crate::relay::RelayManager::retire_where`]) ends
    /// the sessions its persistent connections kept at the brokers, so that they stop queueing
    /// messages for it. A connection shared with other relays ends its session when the last
    /// of them leaves, and only if every relay that left it since the last one joined ended
    /// its sessions too. Not part of what makes a relay restart: the manager keeps the value
    /// the last [`crate::relay::RelayManager::ensure`] gave.
    pub end_sessions: bool,
}

/// A predicate that says whether a relay may open a connection now.
#[derive(Clone)]
pub struct ConnectPermit(pub std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl ConnectPermit {
    pub fn allows(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for ConnectPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectPermit")
    }
}

impl RelayConfig {
    /// The routes that read `side`.
    pub fn reading(&self, side: Side) -> impl Iterator<Item = &RouteConfig> + Clone {
        self.routes
            .iter()
            .filter(move |r| r.direction == side.reads())
    }

    /// The endpoint of `side`.
    pub fn endpoint(&self, side: Side) -> &Endpoint {
        match side {
            Side::Source => &self.source,
            Side::Sink => &self.sink,
        }
    }

    /// The endpoint of `side`, to change.
    pub fn endpoint_mut(&mut self, side: Side) -> &mut Endpoint {
        match side {
            Side::Source => &mut self.source,
            Side::Sink => &mut self.sink,
        }
    }

    /// Whether a route writes to `side`.
    pub fn writes(&self, side: Side) -> bool {
        self.routes.iter().any(|r| r.direction == side.writes())
    }

    pub fn new(
        name: impl Into<String>,
        source: Endpoint,
        sink: Endpoint,
        routes: Vec<RouteConfig>,
    ) -> Self {
        Self {
            name: name.into(),
            source,
            sink,
            routes,
            window: 100,
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(23 * 3600 + 50 * 60),
            credential_margin: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(10),
            stall_after: Duration::from_secs(60),
            connect_permit: None,
            end_sessions: false,
        }
    }
}
