//! Build step: a validated spec plus its Secrets -> the engine's plain configuration. Shared by
//! the controller (Secrets from the API server) and the `bridge` command (Secrets from a folder
//! or the environment).

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::provider::SharedCredentialsProvider;

use crate::api::topic_bridge::{AwsIotSource, ParsedRoute};
use crate::api::{BridgeDeletionPolicy, MqttEndpoint, MqttVersion, SpecError, TopicBridgeSpec};
use crate::aws::AwsClients;
use crate::aws::credentials::{AccessKeys, CognitoIdentity, KeyLoader, LoadedKeys};
use crate::aws::sigv4::IotUrlSigner;
use crate::relay::tls::{self, TlsTrust};
use crate::relay::{Endpoint, Protocol, RelayConfig, RouteConfig, Secret};

/// Why a Secret value could not be read. Messages name the Secret and key, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("Secret '{name}' not found")]
    NotFound { name: String },
    #[error("Secret '{name}' has no key '{key}'")]
    MissingKey { name: String, key: String },
    #[error("reading Secret '{name}' failed: {source}")]
    Other {
        name: String,
        #[source]
        source: crate::error::Source,
    },
    /// The value must be text (access keys) and is not.
    #[error("Secret '{name}' key '{key}' is not UTF-8")]
    NotUtf8 { name: String, key: String },
    /// The Secret does not consent to this use (see the controller's Secret source).
    #[error("{message}")]
    NotAllowed { name: String, message: String },
}

impl SecretError {
    /// The Ready condition's reason while a bridge waits for this Secret.
    pub fn condition_reason(&self) -> &'static str {
        match self {
            SecretError::NotAllowed { .. } => "NotAllowed",
            _ => "SecretNotFound",
        }
    }

    /// The reason label of the error metric.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            SecretError::NotAllowed { .. } => "SecretNotAllowed",
            SecretError::Other { .. } | SecretError::NotUtf8 { .. } => "SecretUnreadable",
            SecretError::NotFound { .. } | SecretError::MissingKey { .. } => "SecretNotFound",
        }
    }
}

pub type SecretFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, SecretError>> + Send + 'a>>;

/// Where Secret values come from. Only Secrets of the bridge's own namespace are reachable.
pub trait SecretSource: Send + Sync {
    fn get<'a>(&'a self, name: &'a str, key: &'a str) -> SecretFuture<'a>;
}

/// Why a relay configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{field}: {source}")]
    Secret {
        field: String,
        #[source]
        source: SecretError,
    },
    #[error("{0}")]
    Invalid(#[source] SpecError),
    #[error(transparent)]
    Aws(#[from] crate::aws::clients::ClientError),
}

/// Settings of the operator that shape every relay.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub window: usize,
    pub drain_timeout: Duration,
    /// See [`crate::relay::RelayConfig::stall_after`].
    pub stall_after: Duration,
    /// See [`crate::relay::Endpoint::read_linger`].
    pub read_linger: Duration,
    /// `wss`; `ws` only for local tests.
    pub aws_iot_scheme: String,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            window: 100,
            drain_timeout: Duration::from_secs(10),
            stall_after: Duration::from_secs(60),
            read_linger: Duration::ZERO,
            aws_iot_scheme: "wss".into(),
        }
    }
}

/// A built relay configuration and the fingerprint of everything it was built from.
pub struct BuiltRelay {
    pub config: RelayConfig,
    pub fingerprint: u64,
}

/// Client id derived from the bridge: stable across restarts, unique per bridge, at most 128
/// characters.
pub fn default_client_id(namespace: &str, name: &str, suffix: &str) -> String {
    let id = format!("iotop-{namespace}-{name}{suffix}");
    if id.len() <= 128 {
        return id;
    }
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    let mut cut = 100;
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{:016x}", &id[..cut], h.finish())
}

async fn read_utf8(
    secrets: &dyn SecretSource,
    field: &str,
    name: &str,
    key: &str,
) -> Result<String, BuildError> {
    let bytes = secrets
        .get(name, key)
        .await
        .map_err(|source| BuildError::Secret {
            field: field.to_owned(),
            source,
        })?;
    String::from_utf8(bytes).map_err(|_| {
        let not_text = SecretError::NotUtf8 {
            name: name.to_owned(),
            key: key.to_owned(),
        };
        BuildError::Invalid(SpecError::new(field, not_text.to_string()))
    })
}

/// Username, password and TLS trust of an MQTT endpoint; each value is also fed to the
/// fingerprint, so a rotated Secret restarts the relay.
async fn endpoint_secrets(
    secrets: &dyn SecretSource,
    field: &str,
    endpoint: &MqttEndpoint,
    hasher: &mut DefaultHasher,
) -> Result<EndpointSecrets, BuildError> {
    let mut out = EndpointSecrets::default();
    if let Some(a) = &endpoint.credentials_secret {
        let f = format!("{field}.credentialsSecret");
        let u = read_utf8(secrets, &f, &a.name, &a.username_key).await?;
        let p = read_utf8(secrets, &f, &a.name, &a.password_key).await?;
        u.hash(hasher);
        p.hash(hasher);
        out.username = Some(u);
        out.password = Some(Secret::new(p));
    }
    if endpoint.insecure_skip_tls_verify {
        true.hash(hasher);
        out.tls = TlsTrust::InsecureSkipVerify;
    } else if let Some(c) = &endpoint.ca_secret {
        let f = format!("{field}.caSecret");
        let bytes = secrets
            .get(&c.name, &c.key)
            .await
            .map_err(|source| BuildError::Secret {
                field: f.clone(),
                source,
            })?;
        bytes.hash(hasher);
        let config = tls::custom_ca(&bytes).map_err(|e| {
            let message = format!("Secret '{}' key '{}': {e}", c.name, c.key);
            BuildError::Invalid(SpecError::caused_by(f, message, e))
        })?;
        out.tls = TlsTrust::Custom(config);
    }
    Ok(out)
}

#[derive(Default)]
struct EndpointSecrets {
    username: Option<String>,
    password: Option<Secret>,
    tls: TlsTrust,
}

fn plain_endpoint(
    e: &MqttEndpoint,
    client_id: String,
    keep_alive: Duration,
    clean_session: bool,
    secrets: EndpointSecrets,
) -> Endpoint {
    let mut ep = Endpoint::new(e.url.clone(), client_id);
    ep.keep_alive = keep_alive;
    ep.clean_session = clean_session;
    (ep.username, ep.password, ep.tls) = (secrets.username, secrets.password, secrets.tls);
    ep
}

async fn aws_endpoint(
    a: &AwsIotSource,
    namespace_secrets: Arc<dyn SecretSource>,
    aws: &AwsClients,
    settings: &RelaySettings,
    client_id: String,
    keep_alive: Duration,
    clean_session: bool,
) -> Result<Endpoint, BuildError> {
    let region = aws.resolve_region(a.region.as_deref())?;
    let role = a.credentials.role_arn.as_deref();
    let config = aws.config_for(&region, role).await;
    let credentials: SharedCredentialsProvider = if let Some(s) = &a.credentials.secret {
        let s = s.clone();
        let source = namespace_secrets.clone();
        let loader: KeyLoader = Arc::new(move || {
            let (s, source) = (s.clone(), source.clone());
            Box::pin(async move {
                let get = |key: String| {
                    let (source, name) = (source.clone(), s.name.clone());
                    async move {
                        let bytes = source
                            .get(&name, &key)
                            .await
                            .map_err(crate::error::Source::new)?;
                        String::from_utf8(bytes).map_err(|_| {
                            crate::error::Source::new(SecretError::NotUtf8 { name, key })
                        })
                    }
                };
                let access_key_id = get(s.access_key_id_key.clone()).await?;
                let secret = get(s.secret_access_key_key.clone()).await?;
                let token = get(s.session_token_key.clone()).await.ok();
                Ok(AccessKeys {
                    access_key_id: access_key_id.trim().to_owned(),
                    secret_access_key: Secret::new(secret.trim()),
                    session_token: token.map(|t| Secret::new(t.trim())),
                })
            })
        });
        SharedCredentialsProvider::new(LoadedKeys::new(loader))
    } else if let Some(c) = &a.credentials.cognito {
        let pool_region = c
            .identity_pool_id
            .split(':')
            .next()
            .unwrap_or(&region)
            .to_owned();
        let cognito_config = aws.config_for(&pool_region, None).await;
        SharedCredentialsProvider::new(CognitoIdentity::new(
            aws_sdk_cognitoidentity::Client::new(&cognito_config),
            c.identity_pool_id.clone(),
            c.identity_id.clone(),
        ))
    } else {
        config.credentials_provider().ok_or_else(|| {
            BuildError::Invalid(SpecError::new(
                "spec.source.awsIot.credentials",
                "the operator has no AWS credentials configured",
            ))
        })?
    };
    let discovery = match &a.endpoint {
        Some(_) => None,
        None => Some(aws.iot(Some(&region), role).await?),
    };
    let signer = IotUrlSigner {
        host: tokio::sync::Mutex::new(a.endpoint.clone()),
        discovery,
        region,
        credentials,
        expires: Duration::from_secs(300),
        scheme: settings.aws_iot_scheme.clone(),
    };
    let host = a.endpoint.clone().unwrap_or_else(|| "discovered".into());
    let mut ep = Endpoint::new(
        format!("{}://{host}/mqtt", settings.aws_iot_scheme),
        client_id,
    );
    ep.keep_alive = keep_alive;
    ep.clean_session = clean_session;
    ep.signer = Some(Arc::new(signer));
    ep.max_message_bytes = crate::relay::config::AWS_IOT_MAX_MESSAGE_BYTES;
    ep.filters_per_subscribe = Some(crate::relay::config::AWS_IOT_FILTERS_PER_SUBSCRIBE);
    Ok(ep)
}

/// Builds the relay configuration of a validated bridge.
/// The relay's protocol for a resource's protocol version.
pub fn protocol(v: MqttVersion) -> Protocol {
    match v {
        MqttVersion::V311 => Protocol::V311,
        MqttVersion::V5 => Protocol::V5,
    }
}

pub async fn build_relay(
    namespace: &str,
    name: &str,
    spec: &TopicBridgeSpec,
    routes: Vec<ParsedRoute>,
    secrets: Arc<dyn SecretSource>,
    aws: &AwsClients,
    settings: &RelaySettings,
) -> Result<BuiltRelay, BuildError> {
    let mut hasher = DefaultHasher::new();
    // The number of connections is not part of a connection's configuration: changing it
    // starts or stops connections, and leaves the others running.
    let mut hashed = spec.clone();
    hashed.connections = 1;
    // The manager takes a changed deletion policy without restarting the relay.
    hashed.deletion_policy = Default::default();
    serde_json::to_string(&hashed)
        .unwrap_or_default()
        .hash(&mut hasher);

    let keep_alive = Duration::from_secs(spec.source.keep_alive_seconds.max(5) as u64);
    let clean = !spec.source.persistent_session;
    let source_id = spec
        .source
        .client_id
        .clone()
        .unwrap_or_else(|| default_client_id(namespace, name, ""));
    let sink_id = spec
        .sink
        .client_id
        .clone()
        .unwrap_or_else(|| default_client_id(namespace, name, "-sink"));

    let source = match (&spec.source.aws_iot, &spec.source.mqtt) {
        (Some(a), _) => {
            aws_endpoint(
                a,
                secrets.clone(),
                aws,
                settings,
                source_id,
                keep_alive,
                clean,
            )
            .await?
        }
        (None, Some(m)) => {
            let s = endpoint_secrets(secrets.as_ref(), "spec.source.mqtt", m, &mut hasher).await?;
            plain_endpoint(m, source_id, keep_alive, clean, s)
        }
        (None, None) => {
            return Err(BuildError::Invalid(SpecError::new(
                "spec.source",
                "exactly one of awsIot or mqtt must be set",
            )));
        }
    };
    let sink_secrets = endpoint_secrets(
        secrets.as_ref(),
        "spec.sink",
        &spec.sink.endpoint,
        &mut hasher,
    )
    .await?;
    let sink = plain_endpoint(
        &spec.sink.endpoint,
        sink_id,
        Duration::from_secs(60),
        clean,
        sink_secrets,
    );

    let route_configs = routes
        .into_iter()
        .map(|p| {
            let r = &spec.routes[p.index];
            RouteConfig {
                name: r
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("routes[{}]", p.index)),
                filter: p.filter,
                template: p.template,
                qos: r.qos.clamp(0, 1) as u8,
                retain: r.retain,
                direction: r.direction,
                share: r.share_group.clone(),
            }
        })
        .collect();
    let (mut source, mut sink) = (source, sink);
    source.protocol = protocol(spec.source.protocol_version);
    sink.protocol = protocol(spec.sink.protocol_version);
    if let Some(n) = spec.source.max_message_bytes {
        source.max_message_bytes = n.max(1) as usize;
    }
    if let Some(n) = spec.sink.max_message_bytes {
        sink.max_message_bytes = n.max(1) as usize;
    }
    source.window = settings.window;
    sink.window = settings.window;
    source.read_linger = settings.read_linger;
    sink.read_linger = settings.read_linger;
    let mut config = RelayConfig::new(format!("{namespace}/{name}"), source, sink, route_configs);
    config.window = settings.window;
    config.drain_timeout = settings.drain_timeout;
    config.stall_after = settings.stall_after;
    config.end_sessions = spec.deletion_policy == BridgeDeletionPolicy::EndSessions;
    settings.window.hash(&mut hasher);
    settings.read_linger.hash(&mut hasher);
    Ok(BuiltRelay {
        config,
        fingerprint: hasher.finish(),
    })
}

/// A client id for connection `index`: the id itself for the first, `<id>-<index>` (the id cut
/// to keep within 128 characters) for the others.
pub fn connection_client_id(id: &str, index: usize) -> String {
    if index == 0 {
        return id.to_owned();
    }
    let suffix = format!("-{index}");
    let mut cut = id.len().min(128 - suffix.len());
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &id[..cut])
}

impl BuiltRelay {
    /// The relay of connection `index` of this bridge: its own client ids on both sides, its
    /// own name (in logs and metrics) and fingerprint.
    pub fn connection(&self, index: usize) -> BuiltRelay {
        let mut config = self.config.clone();
        if index > 0 {
            config.name = crate::relay::ConnectionKey::new(config.name.as_str(), index).to_string();
            config.source.client_id = connection_client_id(&config.source.client_id, index);
            config.sink.client_id = connection_client_id(&config.sink.client_id, index);
        }
        let mut hasher = DefaultHasher::new();
        (self.fingerprint, index).hash(&mut hasher);
        BuiltRelay {
            config,
            fingerprint: hasher.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_keys_and_client_ids() {
        assert_eq!(connection_client_id("iotop-ns-b", 0), "iotop-ns-b");
        assert_eq!(connection_client_id("iotop-ns-b", 2), "iotop-ns-b-2");
        let long = "x".repeat(128);
        let id = connection_client_id(&long, 15);
        assert_eq!(id.len(), 128);
        assert!(id.ends_with("x-15"));
    }

    #[test]
    fn client_ids_are_stable_and_bounded() {
        assert_eq!(default_client_id("ns", "b", ""), "iotop-ns-b");
        let long = "x".repeat(125);
        let a = default_client_id(&long, "b", "");
        assert_eq!(a.len(), 117);
        assert_eq!(a, default_client_id(&long, "b", ""));
        assert_ne!(a, default_client_id(&long, "c", ""));
    }
}
