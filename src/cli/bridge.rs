//! `iot-operator bridge -f topicbridge.yaml`: one relay from a manifest, without Kubernetes,
//! until SIGINT/SIGTERM, then drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{AwsArgs, RelayArgs};
use crate::api::TopicBridge;
use crate::aws::AwsClients;
use crate::convert::topic_bridge::{
    SecretError, SecretFuture, SecretSource, build_relay, connection_key,
};
use crate::relay::RelayManager;
use crate::telemetry::Metrics;
use crate::telemetry::http::{self, Readiness};
use futures::StreamExt;

#[derive(Args, Debug)]
pub struct BridgeArgs {
    /// TopicBridge manifest, YAML or JSON (`-` for standard input).
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

pub async fn bridge(args: BridgeArgs) -> Result<(), String> {
    let tb: TopicBridge = super::read_manifest(&args.file)?;
    let routes = tb
        .spec
        .validate()
        .map_err(|e| format!("invalid TopicBridge: {e}"))?;
    let namespace = tb
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = tb
        .metadata
        .name
        .clone()
        .ok_or("the manifest has no metadata.name")?;
    let metrics = Arc::new(Metrics::new());
    let aws = if tb.spec.source.aws_iot.is_some() {
        AwsClients::load(args.aws.settings(), Some(metrics.clone())).await
    } else {
        AwsClients::offline(args.aws.settings())
    };
    let secrets: Arc<dyn SecretSource> = Arc::new(LocalSecrets {
        dir: args.secrets_dir.clone(),
    });
    let built = build_relay(
        &namespace,
        &name,
        &tb.spec,
        routes,
        secrets,
        &aws,
        &args.relay.settings(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let readiness = Arc::new(Readiness::default());
    if let Some(addr) = args.metrics_addr {
        let listener = http::bind(addr)
            .await
            .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
        tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            readiness.clone(),
            super::shutdown_signal(),
        ));
    }
    let relays = RelayManager::new(Some(metrics));
    let key = format!("{namespace}/{name}");
    // Every connection the manifest asks for, each its own relay.
    let mut views = Vec::new();
    for index in 0..tb.spec.connection_count() {
        let unit = built.connection(index);
        let view = relays
            .ensure(&connection_key(&key, index), unit.fingerprint, unit.config)
            .await
            .ok_or("the relay manager is paused")?;
        views.push(view);
    }
    readiness.set_synced();
    tracing::info!(bridge = %key, connections = views.len(), "relay running; interrupt to stop");
    let mut statuses = futures::stream::select_all(
        views
            .iter()
            .enumerate()
            .map(|(i, v)| Box::pin(status_changes(v.status.clone()).map(move |s| (i, s)))),
    );
    let mut shutdown = std::pin::pin!(super::shutdown_signal());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            next = statuses.next() => {
                let Some((index, s)) = next else { break };
                tracing::info!(connection = index, source = ?s.source, sink = ?s.sink, last_error = s.last_error.as_ref().map_or("", |e| e.message.as_str()), "connection state");
            }
        }
    }
    tracing::info!("stopping: draining messages in flight");
    relays.stop_all().await;
    let relayed: u64 = views.iter().map(|v| v.stats.relayed()).sum();
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
