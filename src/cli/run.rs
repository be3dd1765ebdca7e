//! `iot-operator run`: both controllers, the metrics/health server, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::watch;

use super::{AwsArgs, RelayArgs};
use crate::aws::AwsClients;
use crate::bridge::RelayManager;
use crate::controller::{self, Settings};
use crate::telemetry::Metrics;
use crate::telemetry::http::{self, Readiness};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints.
    #[arg(long, env = "IOT_OPERATOR_METRICS_ADDR", default_value_t = super::default_metrics_addr())]
    pub metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "IOT_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Reconciliations in flight per controller.
    #[arg(long, env = "IOT_OPERATOR_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// Seconds between syncs of every IotPolicyBinding with AWS (drift repair, new identities).
    #[arg(long, env = "IOT_OPERATOR_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub relay: RelayArgs,
}

pub async fn run(args: RunArgs) -> Result<(), String> {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let listener = http::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("--metrics-addr {}: {e}", args.metrics_addr))?;
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("connecting to Kubernetes (kubeconfig or in-cluster service account): {e}")
    })?;
    let aws = Arc::new(AwsClients::load(args.aws.settings(), Some(metrics.clone())).await);
    let relays = Arc::new(RelayManager::new(Some(metrics.clone())));
    let (stop_tx, stop_rx) = watch::channel(false);

    let server = {
        let (metrics, readiness, mut rx) = (metrics.clone(), readiness.clone(), stop_rx.clone());
        tokio::spawn(http::serve(listener, metrics, readiness, async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    };
    tokio::spawn(async move {
        super::shutdown_signal().await;
        tracing::info!("shutdown requested: finishing reconciliations and draining relays");
        let _ = stop_tx.send(true);
    });
    tracing::info!(metrics = %args.metrics_addr, namespace = args.namespace.as_deref().unwrap_or("<all>"), "starting controllers");
    controller::run(
        client,
        Settings {
            namespace: args.namespace,
            concurrency: args.concurrency.max(1),
            resync: Duration::from_secs(args.resync_seconds.max(10)),
            relay: args.relay.settings(),
        },
        metrics,
        readiness,
        aws,
        relays,
        stop_rx,
    )
    .await;
    let _ = server.await;
    Ok(())
}
