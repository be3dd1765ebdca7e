//! Ending a session a broker keeps: for a relay that is gone for good (its bridge deleted, or
//! the connection no longer asked for), so that the broker stops queueing messages nobody will
//! read. MQTT has no request for it: a connection with a clean session (MQTT 5: clean start
//! and no session expiry) makes the broker discard what it kept for the client id, and that
//! connection leaves nothing behind when it disconnects.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::config::{ConnectPermit, Endpoint};
use super::mqtt::{EventLoop, Link, V4, V5};
use super::options::{connect, redact};
use super::status::{RelayObserver, SessionEnd};

/// Why a session could not be ended. The text never holds secrets.
#[derive(Debug, thiserror::Error)]
#[error("ending the session of client id '{client_id}' at {broker} failed: {reason}")]
pub struct EndSessionError {
    pub client_id: String,
    /// The broker's URL, without a query string.
    pub broker: String,
    pub reason: String,
}

/// Ends the session the broker of `endpoint` keeps for its client id: connects once with a
/// clean session, waits for the broker's CONNACK and disconnects, all within `limit`. A signed
/// endpoint (AWS IoT) signs this connection as any other.
pub async fn end_session(endpoint: &Endpoint, limit: Duration) -> Result<(), EndSessionError> {
    let mut e = endpoint.clone();
    e.clean_session = true;
    e.window = 0;
    e.unsubscribe.clear();
    let fail = |reason: String| EndSessionError {
        client_id: e.client_id.clone(),
        broker: redact(&e.url, &e),
        reason,
    };
    let attempt = async {
        let url = match &e.signer {
            Some(signer) => {
                signer
                    .signed_url()
                    .await
                    .map_err(|err| fail(err.to_string()))?
                    .url
            }
            None => crate::vocab::Secret::new(e.url.clone()),
        };
        let (client, eventloop) = connect(&e, url.expose(), e.max_message_bytes, 16)
            .map_err(|err| fail(redact(&err.to_string(), &e)))?;
        drop(url);
        match eventloop {
            EventLoop::V4(mut l) => {
                let mut events = VecDeque::new();
                // The first event is the CONNACK (a refused one is an error).
                l.poll_into(&mut events)
                    .await
                    .map_err(|err| fail(redact(&err.to_string(), &e)))?;
                V4::close(&mut l, &client).await;
            }
            EventLoop::V5(mut l) => {
                loop {
                    match l.poll().await {
                        Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::ConnAck(_))) => {
                            break;
                        }
                        Ok(_) => {}
                        Err(err) => return Err(fail(redact(&err.to_string(), &e))),
                    }
                }
                V5::close(&mut l, &client).await;
            }
        }
        Ok(())
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!("no answer within {}s", limit.as_secs()))),
    }
}

/// How long one attempt to end a session may take.
pub const END_SESSION_LIMIT: Duration = Duration::from_secs(10);
/// Attempts to end a session before it is left to expire at the broker.
const END_SESSION_ATTEMPTS: u32 = 3;

/// The kept sessions of a retired relay's own connections, to be ended.
pub struct KeptSessions {
    pub endpoints: Vec<Endpoint>,
    /// The relay's observer, told how each came out.
    pub observer: Option<Arc<dyn RelayObserver>>,
}

/// Ends `endpoint`'s kept session for the relay `name` that is gone for good, trying a few
/// times (a broker restarting at that moment); what it could not end is logged and left to
/// expire at the broker. Each attempt first asks `permit` (the process's, not the relay's own:
/// a bridge's shard is let go once it is deleted), as every connection does: a replica whose
/// leadership lapsed must not connect with a client id another replica may hold now.
pub(super) async fn end_for_good(
    endpoint: &Endpoint,
    name: &str,
    permit: Option<&ConnectPermit>,
    observer: Option<&Arc<dyn RelayObserver>>,
) {
    let outcome = end_with_retries(endpoint, name, permit).await;
    if let Some(o) = observer {
        o.session_end(outcome);
    }
}

async fn end_with_retries(
    endpoint: &Endpoint,
    name: &str,
    permit: Option<&ConnectPermit>,
) -> SessionEnd {
    for attempt in 1..=END_SESSION_ATTEMPTS {
        if permit.is_some_and(|p| !p.allows()) {
            tracing::warn!(bridge = %name, client_id = %endpoint.client_id, "not permitted to connect now: the session is left at the broker until it expires");
            return SessionEnd::NotPermitted;
        }
        match end_session(endpoint, END_SESSION_LIMIT).await {
            Ok(()) => {
                tracing::info!(bridge = %name, client_id = %endpoint.client_id, "ended the session the broker kept for a connection gone for good");
                return SessionEnd::Ended;
            }
            Err(e) if attempt < END_SESSION_ATTEMPTS => {
                tracing::debug!(bridge = %name, attempt, error = %e, "ending the session failed; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => {
                tracing::warn!(bridge = %name, error = %e, "the session is left at the broker until it expires");
            }
        }
    }
    SessionEnd::Failed
}
