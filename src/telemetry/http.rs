//! The HTTP endpoints: `/healthz` (the process is alive), `/readyz` (the watches have synced, and
//! this replica leads when leader election is on) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Metrics;

/// What `/readyz` reports: the leader (or the only replica) is ready once its watches have
/// synced; a standby replica is ready and says it is standing by.
#[derive(Default)]
pub struct Readiness {
    synced: AtomicBool,
    election: AtomicBool,
    leader: AtomicBool,
}

impl Readiness {
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Leader election is on; `leader` says whether this replica leads (and resets the sync
    /// state: a new leader starts its watches anew).
    pub fn set_leader(&self, leader: bool) {
        self.election.store(true, Ordering::Release);
        self.leader.store(leader, Ordering::Release);
        self.synced.store(false, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Acquire) || self.is_standby()
    }

    fn is_standby(&self) -> bool {
        self.election.load(Ordering::Acquire) && !self.leader.load(Ordering::Acquire)
    }

    fn describe(&self) -> &'static str {
        match (self.is_standby(), self.synced.load(Ordering::Acquire)) {
            (true, _) => "ready: standby (another replica leads)\n",
            (false, true) if self.election.load(Ordering::Acquire) => "ready: leader\n",
            (false, true) => "ready\n",
            (false, false) => "not ready: watches not synced\n",
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn accepts_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// Answers one request.
pub fn route(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if readiness.is_ready() => {
            respond(StatusCode::OK, "text/plain", readiness.describe())
        }
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            readiness.describe(),
        ),
        // OpenMetrics for those who ask for it (Prometheus does); text format 0.0.4 otherwise.
        "/metrics" if accepts_openmetrics(req) => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode_prometheus_text(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Binds the listener (so a taken port fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a metrics/health connection failed");
                continue;
            }
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(&req, &metrics, &readiness);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "metrics/health connection ended with an error");
            }
        });
    }
}
