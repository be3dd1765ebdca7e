//! The command line: `run`, `crd`, `attach`, `bridge`.

pub mod attach;
pub mod bridge;
pub mod run;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::logging::LogFormat;

/// Kubernetes operator for AWS IoT Core: declarative policy attachments (IotPolicyBinding) and
/// SigV4 MQTT-over-WebSocket topic bridges (TopicBridge).
#[derive(Parser, Debug)]
#[command(name = "iot-operator", version, about)]
pub struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = "IOT_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `info,iot_operator=debug`.
    #[arg(
        long,
        global = true,
        env = "IOT_OPERATOR_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
    /// Threads that run reconciliations and relays; 0: one per CPU. 1 runs everything on one
    /// thread, which costs a relay the least CPU per message (no wake-ups across threads, and
    /// the messages of many bridges go out in one write); see BENCHMARKS.md.
    #[arg(
        long,
        global = true,
        env = "IOT_OPERATOR_WORKER_THREADS",
        default_value_t = 0
    )]
    pub worker_threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers against the cluster of the current kubeconfig or service account.
    Run(run::RunArgs),
    /// Print both CustomResourceDefinitions as YAML.
    Crd(CrdArgs),
    /// Sync one IotPolicyBinding manifest with AWS, without Kubernetes.
    Attach(attach::AttachArgs),
    /// Run one TopicBridge manifest as a relay until interrupted, without Kubernetes.
    Bridge(bridge::BridgeArgs),
}

#[derive(Args, Debug)]
pub struct CrdArgs {
    /// Write one file per CRD into this folder instead of printing.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

/// AWS settings shared by the commands that call AWS.
#[derive(Args, Debug, Clone)]
pub struct AwsArgs {
    /// Client-side limit on AWS IoT API requests per second, per account and region.
    #[arg(long, env = "IOT_OPERATOR_AWS_RATE_LIMIT", default_value_t = 10.0)]
    pub aws_rate_limit: f64,
    /// Lower limits for single AWS operations, requests per second per account and region, as
    /// `Operation=rate,...` (default: AWS's default quotas of the calls a pool sync makes most:
    /// ListIdentities=5, ListTargetsForPolicy=10, AttachPolicy=15, DetachPolicy=15). Raise them
    /// with your account's quotas; `Operation=0` removes one.
    #[arg(long, env = "IOT_OPERATOR_AWS_API_RATE_LIMITS", value_parser = parse_api_limit, value_delimiter = ',')]
    pub aws_api_rate_limits: Vec<(String, f64)>,
    /// Use the deprecated AttachPrincipalPolicy/DetachPrincipalPolicy/ListPolicyPrincipals calls
    /// (for accounts whose IAM allows only those). Thing groups still use AttachPolicy.
    #[arg(long, env = "IOT_OPERATOR_LEGACY_ATTACH_API")]
    pub legacy_attach_api: bool,
    /// Send AWS API calls to this URL (a local emulator); AWS_ENDPOINT_URL works as well.
    #[arg(long, env = "IOT_OPERATOR_AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// Attach/detach calls in flight per binding.
    #[arg(long, env = "IOT_OPERATOR_AWS_CONCURRENCY", default_value_t = 4)]
    pub aws_concurrency: usize,
}

/// `Operation=rate`.
fn parse_api_limit(s: &str) -> Result<(String, f64), String> {
    let (op, rate) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected Operation=rate, e.g. ListIdentities=5"))?;
    let rate: f64 = rate
        .trim()
        .parse()
        .map_err(|_| format!("'{s}': the rate is not a number"))?;
    if !(rate >= 0.0 && rate.is_finite()) || op.trim().is_empty() {
        return Err(format!(
            "'{s}': expected an operation name and a rate of 0 or more"
        ));
    }
    Ok((op.trim().to_owned(), rate))
}

impl AwsArgs {
    pub fn settings(&self) -> crate::aws::AwsSettings {
        crate::aws::AwsSettings {
            endpoint_url: self.aws_endpoint_url.clone(),
            rate_limit: self.aws_rate_limit,
            api_rate_limits: {
                let mut limits: Vec<(String, f64)> = crate::aws::clients::DEFAULT_API_RATE_LIMITS
                    .iter()
                    .map(|(op, r)| ((*op).to_owned(), *r))
                    .collect();
                for (op, rate) in &self.aws_api_rate_limits {
                    limits.retain(|(o, _)| o != op);
                    if *rate > 0.0 {
                        limits.push((op.clone(), *rate));
                    }
                }
                limits
            },
            legacy_attach: self.legacy_attach_api,
            concurrency: self.aws_concurrency.max(1),
            ..Default::default()
        }
    }
}

/// Relay settings shared by `run` and `bridge`.
#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// Messages in flight per bridge side (published, not yet acknowledged).
    #[arg(long, env = "IOT_OPERATOR_RELAY_WINDOW", default_value_t = 100)]
    pub relay_window: usize,
    /// Seconds a stopping relay waits for messages in flight.
    #[arg(long, env = "IOT_OPERATOR_DRAIN_TIMEOUT", default_value_t = 10)]
    pub drain_timeout: u64,
    /// Seconds after which a bridge whose brokers are connected, but whose destination has
    /// taken none of the messages waiting for it, is reported stalled (TopicBridge
    /// Ready=False reason Stalled, a Warning Event, a metric and a log line). 0: never.
    #[arg(long, env = "IOT_OPERATOR_STALL_SECONDS", default_value_t = 60)]
    pub stall_seconds: u64,
    /// Milliseconds an MQTT 3.1.1 connection waits, after a read that emptied its socket,
    /// before reading again. A busy stream is then read in larger batches: fewer wake-ups,
    /// reads and TCP acknowledgements per message, for at most this much added latency. 0:
    /// read at once. MQTT 5 connections always read at once.
    #[arg(
        long,
        env = "IOT_OPERATOR_READ_LINGER_MS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u64).range(0..=100)
    )]
    pub read_linger_ms: u64,
    /// Scheme for AWS IoT data connections. Only for local tests against a plain WebSocket
    /// listener; AWS IoT Core needs `wss`.
    #[arg(
        long,
        env = "IOT_OPERATOR_AWS_IOT_DATA_SCHEME",
        default_value = "wss",
        hide = true
    )]
    pub aws_iot_data_scheme: String,
}

impl RelayArgs {
    pub fn settings(&self) -> crate::convert::topic_bridge::RelaySettings {
        crate::convert::topic_bridge::RelaySettings {
            window: self.relay_window.max(1),
            drain_timeout: std::time::Duration::from_secs(self.drain_timeout),
            stall_after: std::time::Duration::from_secs(self.stall_seconds),
            read_linger: std::time::Duration::from_millis(self.read_linger_ms),
            aws_iot_scheme: self.aws_iot_data_scheme.clone(),
        }
    }
}

/// Where the metrics and health endpoints listen.
pub fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Why a command failed: what it was doing, and the error underneath, kept as the source.
/// `main` prints the whole chain ([`crate::error::chain`]).
#[derive(Debug)]
pub struct CliError {
    /// What failed; `None` when the source says it all.
    what: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl CliError {
    /// An error that is only a message.
    pub fn msg(what: impl Into<String>) -> Self {
        Self {
            what: Some(what.into()),
            source: None,
        }
    }

    /// `e` as it is (its text and its sources).
    pub fn wrap(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            what: None,
            source: Some(Box::new(e)),
        }
    }

    /// `e`, with what was being done.
    pub fn with(
        what: impl Into<String>,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            what: Some(what.into()),
            source: Some(Box::new(e)),
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.what, &self.source) {
            (Some(what), _) => f.write_str(what),
            (None, Some(source)) => source.fmt(f),
            (None, None) => Ok(()),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match (&self.what, &self.source) {
            (Some(_), Some(source)) => Some(source.as_ref()),
            // Wrapped as it is: its own sources follow.
            (None, Some(source)) => source.source(),
            (_, None) => None,
        }
    }
}

impl From<String> for CliError {
    fn from(what: String) -> Self {
        Self::msg(what)
    }
}

impl From<&str> for CliError {
    fn from(what: &str) -> Self {
        Self::msg(what)
    }
}

/// Says what was being done when an error happened (it stays the source).
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, CliError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, CliError> {
        self.map_err(|e| CliError::with(what(), e))
    }
}

/// Reads a manifest file (YAML or JSON; `-` for standard input) of kind `K`, checked against
/// the CRD's schema the way the API server would check it: a misspelled field, a wrong kind or
/// a value the CRD refuses is an error naming the field, never dropped in silence.
pub fn read_manifest<K>(path: &std::path::Path) -> Result<K, CliError>
where
    K: serde::de::DeserializeOwned + kube::Resource<DynamicType = ()>,
{
    let text = read_text(path)?;
    let value: serde_json::Value =
        serde_yaml::from_str(&text).context(|| path.display().to_string())?;
    object_from(value).context(|| path.display().to_string())
}

/// Every object of a manifest of one or more YAML documents (`---` between them; empty
/// documents are skipped), each checked as [`read_manifest`] checks one. An error names the
/// document by its place, counted from 1.
pub fn read_manifests<K>(path: &std::path::Path) -> Result<Vec<K>, CliError>
where
    K: serde::de::DeserializeOwned + kube::Resource<DynamicType = ()>,
{
    use serde::Deserialize;
    let text = read_text(path)?;
    let mut objects = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let at = || format!("{}: document {}", path.display(), i + 1);
        let value = serde_json::Value::deserialize(document).context(at)?;
        if value.is_null() {
            continue;
        }
        objects.push(object_from(value).context(at)?);
    }
    if objects.is_empty() {
        return Err(format!("{}: no object in the manifest", path.display()).into());
    }
    Ok(objects)
}

fn read_text(path: &std::path::Path) -> Result<String, CliError> {
    if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context(|| "reading standard input".into())
    } else {
        std::fs::read_to_string(path).context(|| format!("reading {}", path.display()))
    }
}

/// The async runtime for `--worker-threads`. With 1, tokio's current-thread scheduler: it runs
/// woken tasks in the order they were woken, so when one read wakes many bridges' publishers,
/// all of them queue their messages on a shared sink connection before it writes, once. (A
/// multi-thread runtime, even of one worker, runs the task just woken next, and with it the
/// connection, once per message; it also runs the main future on a thread of its own.)
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 0 {
            b.worker_threads(worker_threads);
        }
        b
    };
    builder.enable_all().build()
}

/// One object, checked against its kind's schema (no unknown fields, the right kind).
fn object_from<K>(value: serde_json::Value) -> Result<K, CliError>
where
    K: serde::de::DeserializeOwned + kube::Resource<DynamicType = ()>,
{
    crate::api::schema::check::<K>(&value).map_err(CliError::wrap)?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        CliError::with(path, e.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_thread_is_the_current_thread_scheduler() {
        use tokio::runtime::RuntimeFlavor;
        let flavor = |n| {
            let rt = runtime(n).expect("runtime");
            let handle = rt.handle().clone();
            (handle.runtime_flavor(), handle.metrics().num_workers())
        };
        assert_eq!(flavor(1), (RuntimeFlavor::CurrentThread, 1));
        assert_eq!(flavor(2), (RuntimeFlavor::MultiThread, 2));
        assert_eq!(flavor(0).0, RuntimeFlavor::MultiThread);
        // Timers and sockets work on every flavour (`enable_all`).
        let rt = runtime(1).expect("runtime");
        rt.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
        });
    }

    #[test]
    fn api_rate_limits_override_the_defaults_and_name_what_is_wrong() {
        assert_eq!(
            parse_api_limit("ListIdentities=2.5"),
            Ok(("ListIdentities".into(), 2.5))
        );
        assert!(
            parse_api_limit("ListIdentities")
                .unwrap_err()
                .contains("Operation=rate")
        );
        assert!(
            parse_api_limit("ListIdentities=fast")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(parse_api_limit("=3").is_err());
        let args = AwsArgs {
            aws_rate_limit: 10.0,
            aws_api_rate_limits: vec![
                ("ListIdentities".into(), 40.0),
                ("AttachPolicy".into(), 0.0),
            ],
            legacy_attach_api: false,
            aws_endpoint_url: None,
            aws_concurrency: 4,
        };
        let limits = args.settings().api_rate_limits;
        assert!(limits.contains(&("ListIdentities".into(), 40.0)));
        assert!(
            !limits.iter().any(|(op, _)| op == "AttachPolicy"),
            "0 removes it"
        );
        assert!(
            limits.contains(&("ListTargetsForPolicy".into(), 10.0)),
            "defaults stay"
        );
    }
}
