//! `iot-operator bridge -f topicbridge.yaml`: one relay from a manifest, without Kubernetes,
//! until SIGINT/SIGTERM, then drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{AwsArgs, CliError, Context, RelayArgs};
use crate::api::TopicBridge;
use crate::aws::AwsClients;
use crate::convert::topic_bridge::{SecretError, SecretFuture, SecretSource, build_relay};
use crate::relay::RelayManager;
use crate::telemetry::Metrics;
use crate::telemetry::http::{self, Readiness};
use futures::StreamExt;

#[derive(Args, Debug)]
pub struct BridgeArgs {
    /// TopicBridge manifest, YAML or JSON (`-` for standard input). Several bridges: YAML
    /// documents separated by `---`, each with its own namespace/name.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Folder holding Secrets as `<dir>/<secret-name>/<key>` (the layout of mounted Secret
    /// volumes). Without it, Secrets come from environment variables
    /// `IOT_OPERATOR_SECRET_<NAME>_<KEY>` (upper case, other characters as `_`).
    #[arg(long)]
    pub secrets_dir: Option<PathBuf>,
    /// Serve `/metrics`, `/healthz` and `/readyz` on this address.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub relay: RelayArgs,
}

/// Secrets from files or the environment.
pub struct LocalSecrets {
    dir: Option<PathBuf>,
}

/// The environment variable that holds a Secret key.
pub fn secret_env_name(name: &str, key: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("IOT_OPERATOR_SECRET_{}_{}", clean(name), clean(key))
}

impl SecretSource for LocalSecrets {
    fn get<'a>(&'a self, name: &'a str, key: &'a str) -> SecretFuture<'a> {
        Box::pin(async move {
            match &self.dir {
                Some(dir) => {
                    let folder = dir.join(name);
                    if !folder.is_dir() {
                        return Err(SecretError::NotFound {
                            name: name.to_owned(),
                        });
                    }
                    tokio::fs::read(folder.join(key))
                        .await
                        .map_err(|_| SecretError::MissingKey {
                            name: name.to_owned(),
                            key: key.to_owned(),
                        })
                }
                None => std::env::var(secret_env_name(name, key))
                    .map(String::into_bytes)
                    .map_err(|_| SecretError::MissingKey {
                        name: name.to_owned(),
                        key: key.to_owned(),
                    }),
            }
        })
    }
}

/// One bridge of the manifest, checked: its key (`namespace/name`) and its routes.
struct Checked {
    key: String,
    namespace: String,
    name: String,
    spec: crate::api::TopicBridgeSpec,
    routes: Vec<crate::api::topic_bridge::ParsedRoute>,
}

/// Validates every bridge of the manifest before any starts: an invalid spec or a name used
/// twice stops the command, naming the bridge.
fn check_all(bridges: Vec<TopicBridge>) -> Result<Vec<Checked>, CliError> {
    let mut checked: Vec<Checked> = Vec::with_capacity(bridges.len());
    let mut seen = std::collections::HashSet::new();
    for (i, tb) in bridges.into_iter().enumerate() {
        let namespace = tb
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = tb
            .metadata
            .name
            .clone()
            .ok_or_else(|| format!("document {}: the manifest has no metadata.name", i + 1))?;
        let key = format!("{namespace}/{name}");
        let routes = tb
            .spec
            .validate()
            .context(|| format!("invalid TopicBridge {key}"))?;
        if !seen.insert(key.clone()) {
            return Err(format!(
                "TopicBridge {key} appears twice in the manifest: each bridge needs its own namespace/name"
            )
            .into());
        }
        checked.push(Checked {
            key,
            namespace,
            name,
            spec: tb.spec,
            routes,
        });
    }
    Ok(checked)
}

pub async fn bridge(args: BridgeArgs) -> Result<(), CliError> {
    let bridges = check_all(super::read_manifests::<TopicBridge>(&args.file)?)?;
    let metrics = Arc::new(Metrics::new());
    let aws = if bridges.iter().any(|b| b.spec.source.aws_iot.is_some()) {
        AwsClients::load(args.aws.settings(), Some(metrics.clone())).await
    } else {
        AwsClients::offline(args.aws.settings())
    };
    let secrets: Arc<dyn SecretSource> = Arc::new(LocalSecrets {
        dir: args.secrets_dir.clone(),
    });
    let settings = args.relay.settings();
    let count = bridges.len();
    let mut built = Vec::with_capacity(count);
    for b in bridges {
        let relay = build_relay(
            &b.namespace,
            &b.name,
            &b.spec,
            b.routes,
            secrets.clone(),
            &aws,
            &settings,
        )
        .await
        .context(|| format!("TopicBridge {}", b.key))?;
        built.push((b.key, b.spec.connection_count(), relay));
    }
    let readiness = Arc::new(Readiness::default());
    if let Some(addr) = args.metrics_addr {
        let listener = http::bind(addr)
            .await
            .context(|| format!("--metrics-addr {addr}"))?;
        tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            readiness.clone(),
            super::shutdown_signal(),
        ));
    }
    let relays = RelayManager::new(Some(metrics));
    // Every connection of every bridge, each its own relay.
    let mut views = Vec::new();
    for (key, connections, relay) in &built {
        for index in 0..*connections {
            let unit = relay.connection(index);
            let view = relays
                .ensure(
                    &crate::relay::ConnectionKey::new(key.as_str(), index),
                    unit.fingerprint,
                    unit.config,
                )
                .await
                .ok_or("the relay manager is paused")?;
            views.push((key.as_str(), index, view));
        }
    }
    readiness.set_synced();
    tracing::info!(
        bridges = count,
        connections = views.len(),
        "relays running; interrupt to stop"
    );
    let mut statuses = futures::stream::select_all(views.iter().map(|(key, index, v)| {
        let (key, index) = (*key, *index);
        Box::pin(status_changes(v.status.clone()).map(move |s| (key, index, s)))
    }));
    let mut shutdown = std::pin::pin!(super::shutdown_signal());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            next = statuses.next() => {
                let Some((key, index, s)) = next else { break };
                let stalled = s.stalled.map(|s| s.message());
                tracing::info!(bridge = %key, connection = index, source = ?s.source, sink = ?s.sink, last_error = s.last_error.as_ref().map_or("", |e| e.message.as_str()), stalled = stalled.as_deref().unwrap_or(""), "connection state");
            }
        }
    }
    tracing::info!("stopping: draining messages in flight");
    relays.stop_all().await;
    let relayed: u64 = views.iter().map(|(_, _, v)| v.stats.relayed()).sum();
    tracing::info!(relayed, "stopped");
    Ok(())
}

/// The changes of a status channel, as a stream that ends when the relay does.
fn status_changes(
    rx: tokio::sync::watch::Receiver<crate::relay::RelayStatus>,
) -> impl futures::Stream<Item = crate::relay::RelayStatus> {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let s = rx.borrow_and_update().clone();
        Some((s, rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(name: &str, from: &str) -> String {
        format!(
            "apiVersion: iot.operator.dev/v1alpha1\nkind: TopicBridge\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  source: {{mqtt: {{url: 'mqtt://127.0.0.1:1883'}}}}\n  sink: {{url: 'mqtt://127.0.0.1:1884'}}\n  routes: [{{from: '{from}', to: 'out/{{topic}}'}}]\n"
        )
    }

    fn read(text: &str) -> Result<Vec<Checked>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = dir.path().join("bridges.yaml");
        std::fs::write(&file, text).map_err(|e| e.to_string())?;
        crate::cli::read_manifests(&file)
            .and_then(check_all)
            .map_err(|e| crate::error::chain(&e))
    }

    #[test]
    fn a_manifest_of_many_bridges_yields_each_checked_and_refuses_a_name_used_twice() {
        let many = format!("{}---\n{}---\n", bridge("a", "a/#"), bridge("b", "b/#"));
        let keys: Vec<String> = read(&many).unwrap().into_iter().map(|b| b.key).collect();
        assert_eq!(keys, ["ns/a", "ns/b"]);
        let twice = format!("{}---\n{}", bridge("a", "a/#"), bridge("a", "b/#"));
        let e = read(&twice).err().unwrap();
        assert!(e.contains("ns/a appears twice"), "{e}");
        // A bad second document is named by its place, and nothing runs.
        let bad = format!(
            "{}---\n{}",
            bridge("a", "a/#"),
            bridge("b", "b/#").replace("routes", "routez")
        );
        let e = read(&bad).err().unwrap();
        assert!(e.contains("document 2") && e.contains("routez"), "{e}");
        let invalid = format!("{}---\n{}", bridge("a", "a/#"), bridge("b", "b/#/x"));
        let e = read(&invalid).err().unwrap();
        assert!(e.contains("invalid TopicBridge ns/b"), "{e}");
        assert!(read("---\n").err().unwrap().contains("no object"));
    }

    #[test]
    fn env_names() {
        assert_eq!(
            secret_env_name("mqtt-creds", "password"),
            "IOT_OPERATOR_SECRET_MQTT_CREDS_PASSWORD"
        );
        assert_eq!(
            secret_env_name("aws", "AWS_ACCESS_KEY_ID"),
            "IOT_OPERATOR_SECRET_AWS_AWS_ACCESS_KEY_ID"
        );
    }
}
