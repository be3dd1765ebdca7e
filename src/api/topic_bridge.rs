//! `TopicBridge`: relays MQTT messages between a remote broker (AWS IoT Core over SigV4-signed
//! WebSocket, or any MQTT broker) and an in-cluster broker.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, SecretKeyRef, SpecError, conditions_schema};
use crate::topic::{LoopRoute, NoLocal, TopicFilter, TopicTemplate, find_loop, find_self_feed};
pub use crate::vocab::{Direction, RetainHandling};

/// AWS IoT Core accepts at most this many subscriptions on one connection.
pub const AWS_IOT_MAX_SUBSCRIPTIONS: usize = 50;
/// AWS IoT Core accepts at most this many slashes in a topic or filter.
pub const AWS_IOT_MAX_SLASHES: usize = 7;
/// Longest client id AWS IoT Core accepts.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// Relays MQTT messages between a remote broker (AWS IoT Core over a SigV4-signed WebSocket, or
/// any MQTT broker) and an in-cluster MQTT broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "iot.operator.dev",
    version = "v1alpha1",
    kind = "TopicBridge",
    namespaced,
    shortname = "tb",
    category = "iot",
    status = "TopicBridgeStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.connectionState"}"#,
    printcolumn = r#"{"name":"Relayed","type":"integer","jsonPath":".status.messagesRelayed"}"#,
    printcolumn = r#"{"name":"Dropped","type":"integer","jsonPath":".status.messagesDropped","priority":1}"#,
    printcolumn = r#"{"name":"Replica","type":"string","jsonPath":".status.replica","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.connections) || self.connections <= 1 || self.routes.all(r, has(r.shareGroup))").message("with connections above 1, every route needs shareGroup: otherwise each connection would relay every message"))]
pub struct TopicBridgeSpec {
    /// The remote broker: AWS IoT Core or a third-party MQTT broker.
    pub source: SourceSpec,
    /// The in-cluster broker messages are relayed into (and, for `out` routes, read from).
    pub sink: SinkSpec,
    /// What to relay, and which way. 1 to 50 routes.
    #[schemars(length(min = 1, max = 50))]
    pub routes: Vec<Route>,
    /// How many connections the bridge runs, each to both brokers with client ids of its own
    /// (the first keeps `clientId`, connection n appends `-<n>`). With more than 1, every route
    /// must set `shareGroup`, so that the brokers split the messages between the connections
    /// instead of sending each to all; with `bridgeSharding` the connections are spread over the
    /// operator's replicas. 1 to 16; default 1.
    #[serde(default = "default_connections", skip_serializing_if = "is_one")]
    #[schemars(range(min = 1, max = 16))]
    pub connections: i32,
    /// What deleting the bridge (or lowering `connections`) does at the brokers, with
    /// `source.persistentSession`: `EndSessions` (default) ends the sessions its connections
    /// kept, so the brokers stop queueing messages for them; `RetainSessions` leaves them until
    /// they expire (Mosquitto keeps a 3.1.1 session until it is ended), so that a bridge made
    /// again with the same client ids gets what they queued meanwhile. The operator replica
    /// that runs a connection ends its sessions; a session of a connection that no replica
    /// runs at that moment stays.
    #[serde(default, skip_serializing_if = "BridgeDeletionPolicy::is_default")]
    pub deletion_policy: BridgeDeletionPolicy,
}

/// What deleting a TopicBridge does at the brokers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BridgeDeletionPolicy {
    /// End the sessions the brokers kept for the bridge's connections.
    #[default]
    EndSessions,
    /// Leave them until they expire at the brokers.
    RetainSessions,
}

impl BridgeDeletionPolicy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Most connections one TopicBridge may ask for.
pub const MAX_CONNECTIONS: i32 = 16;

fn default_connections() -> i32 {
    1
}

fn is_one(n: &i32) -> bool {
    *n == 1
}

/// The remote broker. Exactly one of `awsIot` or `mqtt`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.awsIot) != has(self.mqtt)").message("exactly one of source.awsIot or source.mqtt must be set"))]
pub struct SourceSpec {
    /// AWS IoT Core over MQTT-over-WebSocket, signed with SigV4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_iot: Option<AwsIotSource>,
    /// A third-party MQTT broker (no signing), like Amplify's MqttOverWSProvider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttEndpoint>,
    /// MQTT client id on the source. Default: derived from the bridge's namespace and name, so it
    /// is unique per bridge and stable across restarts. Two connections with one client id
    /// disconnect each other, so bridges that give the same `mqtt` URL, client id and credentials
    /// share one connection when they only read the source (no `out` route, no `shareGroup`)
    /// over MQTT 3.1.1: every message goes through each bridge's routes, and one bridge whose
    /// sink falls behind pauses the reading for all of them. Only bridges run by the same
    /// operator replica share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9:_.-]+$"))]
    pub client_id: Option<String>,
    /// MQTT protocol version on the source: `3.1.1` (default) or `5` (AWS IoT Core speaks both).
    /// With `5`, message properties pass through to a sink that speaks 5, the broker's reason
    /// codes reach status and Events, and routes may read back on the source what `out` routes
    /// publish there (the relay subscribes with noLocal, so it never reads its own messages).
    #[serde(default)]
    pub protocol_version: MqttVersion,
    /// MQTT keep-alive in seconds (AWS IoT Core accepts 30-1200). Default 60.
    #[serde(default = "default_keep_alive")]
    #[schemars(range(min = 5, max = 1200))]
    pub keep_alive_seconds: i32,
    /// Keep the MQTT session across reconnects (clean session off), so the broker holds QoS 1
    /// messages while the bridge is away. Default true.
    #[serde(default = "default_true")]
    pub persistent_session: bool,
    /// Largest message payload, in bytes, taken from or sent to this broker. A larger message is
    /// dropped, counted (`status.messagesDropped`, metric
    /// `iot_operator_bridge_messages_too_large_total`), reported in a `MessageDropped` Warning
    /// Event with its route and size, and only then acknowledged, so the messages behind it go
    /// on. Default: 131072 for awsIot (AWS IoT Core's 128 KB limit), 1048576 for mqtt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 268435455))]
    pub max_message_bytes: Option<i64>,
}

fn default_keep_alive() -> i32 {
    60
}

fn default_true() -> bool {
    true
}

/// AWS IoT Core as the source.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsIotSource {
    /// Data endpoint host, e.g. `abc123example-ats.iot.eu-west-1.amazonaws.com` (no scheme, no
    /// path). Default: discovered with DescribeEndpoint (`iot:Data-ATS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
    )]
    pub endpoint: Option<String>,
    /// AWS region, e.g. `eu-west-1`. Default: the operator's AWS configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,
    /// Where signing credentials come from. Default (empty): the operator's own credential chain
    /// (IRSA, EKS Pod Identity, environment).
    #[serde(default)]
    pub credentials: AwsCredentialsSource,
}

/// Where the credentials that sign the WebSocket URL come from. At most one field; none means the
/// operator's own credential chain.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.secret) ? 1 : 0) + (has(self.cognito) ? 1 : 0) + (has(self.roleArn) ? 1 : 0) <= 1").message("set at most one of credentials.secret, credentials.cognito or credentials.roleArn"))]
pub struct AwsCredentialsSource {
    /// Access keys from a Secret in the bridge's namespace. The Secret must name this bridge in
    /// its annotation `iot.operator.dev/topic-bridges`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<AwsKeysSecret>,
    /// Temporary credentials of a Cognito identity, obtained like Amplify does (GetId, then
    /// GetCredentialsForIdentity), renewed before they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cognito: Option<CognitoCredentials>,
    /// IAM role to assume with the operator's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$"
    ))]
    pub role_arn: Option<String>,
}

/// A Secret holding AWS access keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsKeysSecret {
    /// Name of the Secret in the bridge's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the access key id. Default `AWS_ACCESS_KEY_ID`.
    #[serde(default = "default_access_key_key")]
    pub access_key_id_key: String,
    /// Key holding the secret access key. Default `AWS_SECRET_ACCESS_KEY`.
    #[serde(default = "default_secret_key_key")]
    pub secret_access_key_key: String,
    /// Key holding a session token, if there is one. Default `AWS_SESSION_TOKEN`.
    #[serde(default = "default_session_token_key")]
    pub session_token_key: String,
}

fn default_access_key_key() -> String {
    "AWS_ACCESS_KEY_ID".into()
}
fn default_secret_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}
fn default_session_token_key() -> String {
    "AWS_SESSION_TOKEN".into()
}

/// A Cognito identity whose temporary credentials sign the connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CognitoCredentials {
    /// Identity-pool id (`<region>:<uuid>`).
    #[schemars(regex(
        pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    ))]
    pub identity_pool_id: String,
    /// Identity id to use. Default: a new unauthenticated identity from GetId, kept for the
    /// bridge's lifetime. The identity needs an attached IoT policy (see IotPolicyBinding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    ))]
    pub identity_id: Option<String>,
}

/// An MQTT broker reached by URL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.insecureSkipTlsVerify) || !self.insecureSkipTlsVerify || ((self.url.startsWith('mqtts://') || self.url.startsWith('wss://')) && !has(self.caSecret))").message("insecureSkipTlsVerify applies only to mqtts:// and wss:// URLs, and not together with caSecret"))]
pub struct MqttEndpoint {
    /// Broker URL: `mqtt://host:1883`, `mqtts://host:8883`, `ws://host:8080/mqtt` or
    /// `wss://host/mqtt`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(wss?|mqtts?)://[^/?#@]+')").message("url must start with ws://, wss://, mqtt:// or mqtts:// followed by a host"))]
    pub url: String,
    /// Secret with the MQTT username and password (keys `username` and `password`). The Secret
    /// must name this bridge in its annotation `iot.operator.dev/topic-bridges`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<BasicAuthSecret>,
    /// CA certificate (PEM) to verify the broker's TLS certificate, for `mqtts://` and `wss://`;
    /// the Secret must name this bridge in its annotation `iot.operator.dev/topic-bridges`.
    /// Default: the system's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// Accept any TLS certificate from this broker: the connection is encrypted but the broker
    /// is not authenticated, so anyone on the path can read and inject messages. For test
    /// brokers only; every connection logs a warning and the bridge gets a Warning Event.
    /// Only for `mqtts://` and `wss://`, and not together with `caSecret`. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_skip_tls_verify: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `insecureSkipTlsVerify` only where there is TLS, and not next to a CA that would be ignored.
fn validate_tls_choice(e: &MqttEndpoint, field: &str) -> Result<(), SpecError> {
    if !e.insecure_skip_tls_verify {
        return Ok(());
    }
    let f = format!("{field}.insecureSkipTlsVerify");
    if !(e.url.starts_with("mqtts://") || e.url.starts_with("wss://")) {
        return Err(SpecError::new(
            f,
            "applies only to mqtts:// and wss:// URLs",
        ));
    }
    if e.ca_secret.is_some() {
        return Err(SpecError::new(
            f,
            "cannot be combined with caSecret: either verify against the CA or not at all",
        ));
    }
    Ok(())
}

/// A Secret holding an MQTT username and password.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuthSecret {
    /// Name of the Secret in the bridge's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the username. Default `username`.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key holding the password. Default `password`.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// The in-cluster broker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SinkSpec {
    /// The broker's URL and credentials.
    #[serde(flatten)]
    pub endpoint: MqttEndpoint,
    /// MQTT client id on the sink. Default: derived from the bridge's namespace and name.
    /// Bridges that give the same sink URL, client id and credentials share one connection
    /// when they only publish to the sink (no `out` route) over MQTT 3.1.1: each idle bridge
    /// then costs about half the memory, and the broker holds one session for all of them.
    /// Only bridges run by the same operator replica share: with bridge sharding, do not give
    /// bridges one sink client id (replicas would take the connection from each other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9:_.-]+$"))]
    pub client_id: Option<String>,
    /// MQTT protocol version on the sink: `3.1.1` (default; NATS speaks only this) or `5`
    /// (Mosquitto 2, EMQX). With `5`, message properties (user properties, content type,
    /// payload format, correlation data, response topic, message expiry less the time spent in
    /// the relay) pass through from a source that speaks 5, the broker's reason codes reach
    /// status and Events, and `out` routes may read what `in` routes publish on the sink (the
    /// relay subscribes with noLocal, so it never reads its own messages back).
    #[serde(default)]
    pub protocol_version: MqttVersion,
    /// Largest message payload, in bytes, sent to or taken from the in-cluster broker; set it to
    /// the broker's own limit (Mosquitto `message_size_limit`, EMQX `max_packet_size`, NATS
    /// `max_payload`). A larger message is dropped, counted, reported in a `MessageDropped`
    /// Warning Event and only then acknowledged. Default 1048576.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 268435455))]
    pub max_message_bytes: Option<i64>,
}

/// MQTT protocol version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

/// One relay rule: messages on topics matching `from` are published to `to` on the other side.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Optional name, used in status messages and metrics. Default: `routes[<index>]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// MQTT topic filter to subscribe to on the reading side. `+` matches one level and `#` (last
    /// level only) any number of levels, e.g. `devices/+/telemetry` or `alerts/#`.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^(#|([+]|[^+#/]*)(/([+]|[^+#/]*))*(/#)?)$')").message("wildcards must fill a whole level: '+' anywhere, '#' only as the last level"))]
    pub from: String,
    /// Topic to publish to on the writing side. `{topic}` stands for the whole topic the message
    /// arrived on, `{1}`, `{2}`, ... for its levels, e.g. `cluster/{topic}` or `site/{2}/data`.
    /// Default: the same topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^([^{}+#]|[{](topic|[1-9][0-9]?)[}])*$')").message("to is a topic (no '+' or '#') with optional placeholders {topic} or {1}..{99}"))]
    pub to: Option<String>,
    /// QoS to subscribe and publish with: 0 (at most once) or 1 (at least once; acknowledged to
    /// the reading side only after the writing side has it). Default 1.
    #[serde(default = "default_qos")]
    #[schemars(range(min = 0, max = 1))]
    pub qos: i32,
    /// What to do with the retain flag: `Preserve` (default) relays it, `Clear` publishes
    /// without it, `SkipRetained` does not relay retained messages at all.
    #[serde(default)]
    pub retain: RetainHandling,
    /// `in` (default): from the source to the in-cluster sink; `out`: from the sink to the source.
    #[serde(default)]
    pub direction: Direction,
    /// Subscribe as a shared subscription, `$share/<shareGroup>/<from>`, on the side the route
    /// reads: the broker hands each message to one member of the group (AWS IoT Core, Mosquitto
    /// 2, EMQX; MQTT 3.1.1 and 5), so the bridge's `connections`, or other subscribers in the
    /// same group, split the stream. Required on every route when `connections` is above 1.
    /// Letters, digits, `-`, `_` and `.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    pub share_group: Option<String>,
}

fn default_qos() -> i32 {
    1
}

/// Observed state of a TopicBridge.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicBridgeStatus {
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `SourceConnected` and `SinkConnected`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Connection state of the relay, in Amplify's terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    /// Messages relayed since the relay started.
    #[serde(default)]
    pub messages_relayed: i64,
    /// Messages dropped since the relay started: QoS 0 messages the sink could not keep up
    /// with, and messages over a side's `maxMessageBytes` (retained messages skipped by
    /// `SkipRetained` are not counted).
    #[serde(default)]
    pub messages_dropped: i64,
    /// The last message dropped as too large: route, direction, size and the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dropped: Option<String>,
    /// When the last message was relayed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message_time: Option<String>,
    /// The last connection or relay error, without secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The operator replica (pod name) that runs this bridge and wrote this status (with
    /// several `connections`: the one that runs the first connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// With several `connections`: each connection's replica, state and counters. The fields
    /// above are the first connection's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "connections_schema")]
    pub connections: Vec<ConnectionStatus>,
    /// What the relay subscribed on each broker when it last connected. A relay started later
    /// (after a restart, on another replica) unsubscribes from a persistent session the broker
    /// kept what the spec no longer reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriptions: Option<SessionSubscriptions>,
}

/// Topic filters a bridge's sessions subscribe, per broker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSubscriptions {
    /// On the source (`$share/<group>/<filter>` for a shared subscription).
    #[serde(default)]
    pub source: Vec<String>,
    /// On the sink (routes with direction `out`).
    #[serde(default)]
    pub sink: Vec<String>,
}

/// One connection of a bridge that runs several.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// The connection's number, from 0.
    pub index: i32,
    /// The replica (pod name) that runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Its connection state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    /// Messages it relayed since it started.
    #[serde(default)]
    pub messages_relayed: i64,
    /// Its last connection or relay error, without secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Set while it is stalled: which broker is connected but takes none of the messages
    /// waiting for it, and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
}

fn connections_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = generator.subschema_for::<ConnectionStatus>();
    schemars::json_schema!({
        "type": "array",
        "items": item,
        "maxItems": MAX_CONNECTIONS,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["index"],
    })
}

/// Connection state of a relay.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ConnectionState {
    /// Both sides are connected.
    Connected,
    /// The relay is connecting for the first time.
    Connecting,
    /// A connection was lost and the relay is reconnecting.
    ConnectionDisrupted,
    /// The relay is stopped.
    Disconnected,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "Connected",
            Self::Connecting => "Connecting",
            Self::ConnectionDisrupted => "ConnectionDisrupted",
            Self::Disconnected => "Disconnected",
        }
    }
}

impl Route {
    /// The name used for this route in messages: its `name`, or `routes[<index>]`.
    pub fn display_name(&self, index: usize) -> String {
        match &self.name {
            Some(n) => format!("routes[{index}] ({n})"),
            None => format!("routes[{index}]"),
        }
    }
}

/// A route with its filter and template parsed.
#[derive(Debug, Clone)]
pub struct ParsedRoute {
    pub index: usize,
    pub filter: TopicFilter,
    pub template: TopicTemplate,
}

impl TopicBridgeSpec {
    /// The `insecureSkipTlsVerify` fields that are on.
    pub fn insecure_tls_fields(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self
            .source
            .mqtt
            .as_ref()
            .is_some_and(|m| m.insecure_skip_tls_verify)
        {
            f.push("spec.source.mqtt.insecureSkipTlsVerify");
        }
        if self.sink.endpoint.insecure_skip_tls_verify {
            f.push("spec.sink.insecureSkipTlsVerify");
        }
        f
    }

    /// How many connections the bridge runs (`connections`, within 1 to 16).
    pub fn connection_count(&self) -> usize {
        self.connections.clamp(1, MAX_CONNECTIONS) as usize
    }

    /// Checks what the CRD schema cannot, and returns the routes parsed. The first problem is
    /// returned, naming the field.
    pub fn validate(&self) -> Result<Vec<ParsedRoute>, SpecError> {
        let aws = match (&self.source.aws_iot, &self.source.mqtt) {
            (Some(_), None) => true,
            (None, Some(_)) => false,
            _ => {
                return Err(SpecError::new(
                    "spec.source",
                    "exactly one of awsIot or mqtt must be set",
                ));
            }
        };
        if let Some(m) = &self.source.mqtt {
            validate_url(&m.url, "spec.source.mqtt.url")?;
            validate_tls_choice(m, "spec.source.mqtt")?;
        }
        validate_url(&self.sink.endpoint.url, "spec.sink.url")?;
        validate_tls_choice(&self.sink.endpoint, "spec.sink")?;
        if let Some(a) = &self.source.aws_iot {
            let c = &a.credentials;
            let n =
                c.secret.is_some() as u8 + c.cognito.is_some() as u8 + c.role_arn.is_some() as u8;
            if n > 1 {
                return Err(SpecError::new(
                    "spec.source.awsIot.credentials",
                    "set at most one of secret, cognito or roleArn",
                ));
            }
            if let Some(ep) = &a.endpoint
                && (ep.contains("://") || ep.contains('/'))
            {
                return Err(SpecError::new(
                    "spec.source.awsIot.endpoint",
                    "is a host name only, without scheme or path",
                ));
            }
            if !(30..=1200).contains(&self.source.keep_alive_seconds) {
                return Err(SpecError::new(
                    "spec.source.keepAliveSeconds",
                    "AWS IoT Core accepts a keep-alive of 30 to 1200 seconds",
                ));
            }
        }
        for (field, id) in [
            ("spec.source.clientId", &self.source.client_id),
            ("spec.sink.clientId", &self.sink.client_id),
        ] {
            if let Some(id) = id
                && (id.is_empty() || id.len() > MAX_CLIENT_ID_LEN)
            {
                return Err(SpecError::new(
                    field,
                    format!("must be 1 to {MAX_CLIENT_ID_LEN} characters"),
                ));
            }
        }
        if self.routes.is_empty() {
            return Err(SpecError::new(
                "spec.routes",
                "must have at least one route",
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(SpecError::new(
                "spec.connections",
                format!("must be 1 to {MAX_CONNECTIONS}"),
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            match &r.share_group {
                Some(g)
                    if g.is_empty()
                        || g.len() > 64
                        || !g
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) =>
                {
                    return Err(SpecError::new(
                        format!("spec.routes[{i}].shareGroup"),
                        "must be 1 to 64 letters, digits, '-', '_' or '.'",
                    ));
                }
                None if self.connections > 1 => {
                    return Err(SpecError::new(
                        format!("spec.routes[{i}].shareGroup"),
                        format!(
                            "is required with connections: {}; otherwise each connection \
                             would relay every message",
                            self.connections
                        ),
                    ));
                }
                _ => {}
            }
        }
        let mut parsed = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let filter = TopicFilter::parse(&r.from).map_err(|e| {
                let message = format!("'{}' {e}", r.from);
                SpecError::caused_by(format!("spec.routes[{i}].from"), message, e)
            })?;
            let template = match &r.to {
                None => TopicTemplate::same_topic(),
                Some(to) => TopicTemplate::parse(to, &filter).map_err(|e| {
                    let message = format!("'{to}' {e}");
                    SpecError::caused_by(format!("spec.routes[{i}].to"), message, e)
                })?,
            };
            if !(0..=1).contains(&r.qos) {
                return Err(SpecError::new(
                    format!("spec.routes[{i}].qos"),
                    "must be 0 or 1 (AWS IoT Core has no QoS 2)",
                ));
            }
            if aws {
                // The side that talks to AWS IoT: `in` filters subscribe there, `out` templates
                // publish there.
                let remote = match r.direction {
                    Direction::In => filter.clone(),
                    Direction::Out => template.output_filter(&filter),
                };
                if remote.slashes() > AWS_IOT_MAX_SLASHES {
                    let field = match r.direction {
                        Direction::In => "from",
                        Direction::Out => "to",
                    };
                    return Err(SpecError::new(
                        format!("spec.routes[{i}].{field}"),
                        format!(
                            "AWS IoT Core allows at most {AWS_IOT_MAX_SLASHES} slashes in a topic"
                        ),
                    ));
                }
            }
            parsed.push(ParsedRoute {
                index: i,
                filter,
                template,
            });
        }
        if aws {
            let mut filters: Vec<&str> = self
                .routes
                .iter()
                .filter(|r| r.direction == Direction::In)
                .map(|r| r.from.as_str())
                .collect();
            filters.sort_unstable();
            filters.dedup();
            if filters.len() > AWS_IOT_MAX_SUBSCRIPTIONS {
                return Err(SpecError::new(
                    "spec.routes",
                    format!(
                        "{} distinct `in` filters; AWS IoT Core allows at most {AWS_IOT_MAX_SUBSCRIPTIONS} subscriptions per connection",
                        filters.len()
                    ),
                ));
            }
        }
        detect_loops(self, &parsed)?;
        Ok(parsed)
    }
}

/// Rejects specs where a message could travel in a circle: what an `in` route publishes on the
/// sink is read back by an `out` route (or the reverse on the source). A side that speaks MQTT
/// 5 is subscribed with noLocal and cannot close a circle.
fn detect_loops(spec: &TopicBridgeSpec, parsed: &[ParsedRoute]) -> Result<(), SpecError> {
    let routes = &spec.routes;
    let seen: Vec<LoopRoute<'_>> = parsed
        .iter()
        .map(|p| LoopRoute {
            inbound: routes[p.index].direction == Direction::In,
            filter: &p.filter,
            template: &p.template,
        })
        .collect();
    // MQTT 5 forbids noLocal on shared subscriptions: a side read through one can close a
    // circle again.
    let shared_on = |d: Direction| {
        routes
            .iter()
            .any(|r| r.direction == d && r.share_group.is_some())
    };
    let no_local = NoLocal {
        source: spec.source.protocol_version == MqttVersion::V5 && !shared_on(Direction::In),
        sink: spec.sink.protocol_version == MqttVersion::V5 && !shared_on(Direction::Out),
    };
    let name = |i: usize| routes[parsed[i].index].display_name(parsed[i].index);
    if let Some(broker) = spec
        .source
        .mqtt
        .as_ref()
        .and_then(|m| same_broker(&m.url, &spec.sink.endpoint.url))
        && let Some(feed) = find_self_feed(&seen)
    {
        let (writer, reader) = (name(feed.writer), name(feed.reader));
        let reads = if feed.writer == feed.reader {
            "its own filter".to_owned()
        } else {
            format!("{reader}'s filter '{}'", feed.reads)
        };
        return Err(SpecError::new(
            format!("spec.routes[{}].to", parsed[feed.writer].index),
            format!(
                "{writer} publishes '{}' on {broker}, which is both source and sink, and \
                 {reads} reads it back there: every message would be relayed again and again",
                feed.publishes
            ),
        ));
    }
    let Some(found) = find_loop(&seen, no_local) else {
        return Ok(());
    };
    let (na, nb) = (name(found.inbound), name(found.outbound));
    let why = if found.on_sink {
        format!(
            "{nb} reads '{}' on the sink, which matches what {na} publishes there ('{}')",
            found.reads, found.publishes
        )
    } else {
        format!(
            "{na} reads '{}' on the source, which matches what {nb} publishes there ('{}')",
            found.reads, found.publishes
        )
    };
    Err(SpecError::new(
        "spec.routes",
        format!("{na} and {nb} form a loop: {why}"),
    ))
}

/// `scheme://host:port` when two broker URLs name the same listener (scheme and host compared
/// without case, the port with the scheme's default filled in), else `None`.
fn same_broker(a: &str, b: &str) -> Option<String> {
    let key = |raw: &str| {
        let url = url::Url::parse(raw).ok()?;
        let port = url
            .port()
            .or_else(|| crate::vocab::default_port(url.scheme()))?;
        let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
        Some(format!("{}://{host}:{port}", url.scheme()))
    };
    let (ka, kb) = (key(a)?, key(b)?);
    (ka == kb).then_some(ka)
}

fn validate_url(raw: &str, field: &str) -> Result<(), SpecError> {
    let url = url::Url::parse(raw)
        .map_err(|e| SpecError::caused_by(field, format!("is not a URL: {e}"), e))?;
    if !matches!(url.scheme(), "ws" | "wss" | "mqtt" | "mqtts") {
        return Err(SpecError::new(
            field,
            format!(
                "scheme '{}' is not one of ws, wss, mqtt, mqtts",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(SpecError::new(field, "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(SpecError::new(
            field,
            "must not carry credentials; use credentialsSecret",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(from: &str, to: Option<&str>, direction: Direction) -> Route {
        Route {
            name: None,
            from: from.into(),
            to: to.map(Into::into),
            qos: 1,
            retain: RetainHandling::Preserve,
            direction,
            share_group: None,
        }
    }

    fn spec(routes: Vec<Route>) -> TopicBridgeSpec {
        TopicBridgeSpec {
            source: SourceSpec {
                aws_iot: Some(AwsIotSource {
                    endpoint: Some("abc-ats.iot.eu-west-1.amazonaws.com".into()),
                    region: Some("eu-west-1".into()),
                    credentials: AwsCredentialsSource::default(),
                }),
                mqtt: None,
                client_id: None,
                protocol_version: MqttVersion::V311,
                keep_alive_seconds: 60,
                persistent_session: true,
                max_message_bytes: None,
            },
            sink: SinkSpec {
                endpoint: MqttEndpoint {
                    url: "mqtt://mosquitto.mqtt:1883".into(),
                    credentials_secret: None,
                    ca_secret: None,
                    insecure_skip_tls_verify: false,
                },
                client_id: None,
                protocol_version: MqttVersion::V311,
                max_message_bytes: None,
            },
            routes,
            connections: 1,
            deletion_policy: BridgeDeletionPolicy::EndSessions,
        }
    }

    #[test]
    fn several_connections_need_a_share_group_on_every_route() {
        let mut s = spec(vec![
            route("a/#", None, Direction::In),
            route("b/#", Some("c/{topic}"), Direction::Out),
        ]);
        s.connections = 3;
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.routes[0].shareGroup");
        assert!(e.message.contains("connections: 3"), "{e}");
        s.routes[0].share_group = Some("relay".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.routes[1].shareGroup");
        s.routes[1].share_group = Some("relay".into());
        assert!(s.validate().is_ok());
        s.routes[1].share_group = Some("a/b".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.routes[1].shareGroup");
        s.routes[1].share_group = Some("relay".into());
        s.connections = 17;
        assert_eq!(s.validate().unwrap_err().field, "spec.connections");
        assert_eq!(s.connection_count(), 16);
    }

    /// MQTT 5 forbids noLocal on shared subscriptions, so a circle is caught again on a side
    /// read through one.
    #[test]
    fn a_shared_subscription_gives_up_no_local() {
        let mut s = spec(vec![
            route("sync/#", None, Direction::In),
            route("sync/#", None, Direction::Out),
        ]);
        s.source.protocol_version = MqttVersion::V5;
        s.sink.protocol_version = MqttVersion::V5;
        assert!(s.validate().is_ok(), "noLocal on both sides");
        s.routes[1].share_group = Some("g".into());
        assert!(s.validate().unwrap_err().message.contains("loop"));
    }

    #[test]
    fn valid_spec_parses_routes() {
        let s = spec(vec![
            route(
                "devices/+/telemetry",
                Some("cluster/{2}/telemetry"),
                Direction::In,
            ),
            route("commands/#", Some("devices/cmd/{topic}"), Direction::Out),
        ]);
        let parsed = s.validate().unwrap();
        assert_eq!(parsed.len(), 2);
    }

    #[test]
    fn rejects_a_loop_naming_both_routes() {
        let mut out = route("cluster/#", Some("devices/{topic}"), Direction::Out);
        out.name = Some("back".into());
        let s = spec(vec![
            route("devices/#", Some("cluster/{topic}"), Direction::In),
            out,
        ]);
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "spec.routes");
        assert!(err.message.contains("routes[0]"), "{err}");
        assert!(err.message.contains("routes[1] (back)"), "{err}");
    }

    #[test]
    fn rejects_a_reverse_loop() {
        // The out route publishes on the source what the in route reads there.
        let s = spec(vec![
            route("a/#", Some("in/{topic}"), Direction::In),
            route("cmd/#", Some("a/x"), Direction::Out),
        ]);
        assert!(s.validate().unwrap_err().message.contains("loop"));
    }

    /// The bridge that fed itself: source and sink one Mosquitto, `a/#` to `a/copy/{topic}`.
    /// One message became 100 in 3 s before; now the spec is refused, naming the route.
    #[test]
    fn a_route_that_feeds_itself_on_one_broker_is_refused() {
        let mut s = spec(vec![
            route("up/#", Some("cluster/{topic}"), Direction::In),
            route("a/#", Some("a/copy/{topic}"), Direction::In),
        ]);
        s.source.aws_iot = None;
        s.source.mqtt = Some(MqttEndpoint {
            url: "mqtt://Mosquitto.MQTT".into(),
            credentials_secret: None,
            ca_secret: None,
            insecure_skip_tls_verify: false,
        });
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "spec.routes[1].to");
        assert!(
            err.message.contains("routes[1] publishes 'a/copy/a/#'"),
            "{err}"
        );
        assert!(err.message.contains("mqtt://mosquitto.mqtt:1883"), "{err}");
        assert!(err.message.contains("its own filter"), "{err}");
        // The same topics between two brokers (another port) are fine.
        if let Some(m) = s.source.mqtt.as_mut() {
            m.url = "mqtt://mosquitto.mqtt:1884".into();
        }
        assert!(s.validate().is_ok());
        // One broker, but what is published is read by nothing.
        if let Some(m) = s.source.mqtt.as_mut() {
            m.url = "mqtt://mosquitto.mqtt:1883".into();
        }
        s.routes[1].to = Some("b/copy/{topic}".into());
        assert!(s.validate().is_ok());
        // Without `to`, a route on one broker republishes the topic it read.
        s.routes[1].to = None;
        assert_eq!(s.validate().unwrap_err().field, "spec.routes[1].to");
        // Two routes feeding each other.
        s.routes[1].to = Some("up/{topic}".into());
        let err = s.validate().unwrap_err();
        assert!(err.message.contains("routes[0]'s filter 'up/#'"), "{err}");
    }

    #[test]
    fn non_overlapping_routes_pass() {
        let s = spec(vec![
            route("up/#", Some("cluster/up/{topic}"), Direction::In),
            route("cluster/down/#", Some("down/{topic}"), Direction::Out),
        ]);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn rejects_more_than_50_filters_for_aws() {
        let routes = (0..51)
            .map(|i| route(&format!("t/{i}"), Some("x/{topic}"), Direction::In))
            .collect();
        let err = spec(routes).validate().unwrap_err();
        assert!(err.message.contains("50"), "{err}");
    }

    #[test]
    fn rejects_bad_filters_and_templates() {
        let err = spec(vec![route("a/#/b", None, Direction::In)])
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "spec.routes[0].from");
        let err = spec(vec![route("a/+", Some("x/{3}"), Direction::In)])
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "spec.routes[0].to");
        let err = spec(vec![route("a/b/c/d/e/f/g/h/i", None, Direction::In)])
            .validate()
            .unwrap_err();
        assert!(err.message.contains("slashes"));
    }

    #[test]
    fn source_and_urls() {
        let mut s = spec(vec![route("a", None, Direction::In)]);
        s.source.mqtt = Some(MqttEndpoint {
            url: "ws://broker:8080/mqtt".into(),
            credentials_secret: None,
            ca_secret: None,
            insecure_skip_tls_verify: false,
        });
        assert_eq!(s.validate().unwrap_err().field, "spec.source");
        s.source.aws_iot = None;
        assert!(s.validate().is_ok());
        // Turning verification off needs TLS, and excludes a CA.
        s.sink.endpoint.insecure_skip_tls_verify = true;
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.sink.insecureSkipTlsVerify"
        );
        s.sink.endpoint.url = "mqtts://mosquitto.mqtt:8883".into();
        assert!(s.validate().is_ok());
        assert_eq!(
            s.insecure_tls_fields(),
            vec!["spec.sink.insecureSkipTlsVerify"]
        );
        s.sink.endpoint.ca_secret = Some(SecretKeyRef {
            name: "ca".into(),
            key: "ca.crt".into(),
        });
        assert!(s.validate().unwrap_err().message.contains("caSecret"));
        s.sink.endpoint.url = "http://x".into();
        assert_eq!(s.validate().unwrap_err().field, "spec.sink.url");
        s.sink.endpoint.url = "mqtt://user:pw@x".into();
        let err = s.validate().unwrap_err();
        assert!(!err.message.contains("pw"));
    }
}
