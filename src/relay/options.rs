//! rumqttc connection options from an [`Endpoint`], and error text with secrets cut out.

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use super::config::{Endpoint, Protocol};
use super::mqtt::{Client, EventLoop, Lean};
use super::tls::TlsTrust;

/// Why building connection options failed.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("invalid broker URL: {0}")]
    Url(#[source] url::ParseError),
    #[error("invalid broker URL: it names no host")]
    NoHost,
    #[error("unsupported URL scheme '{0}'")]
    Scheme(String),
    #[error("{0}")]
    Tls(#[from] super::tls::TlsError),
}

/// What an MQTT PUBLISH adds to its payload at most: topic length, a topic of up to 65,535
/// bytes, packet id.
pub(super) const PUBLISH_OVERHEAD: usize = 2 + 65_535 + 2;
/// The largest remaining length MQTT can express.
pub(super) const MQTT_MAX_REMAINING: usize = 268_435_455;

/// rumqttc options for one connection attempt. `url` may be a freshly signed one.
pub fn mqtt_options(endpoint: &Endpoint, url: &str) -> Result<MqttOptions, OptionsError> {
    mqtt_options_reading(endpoint, url, endpoint.max_message_bytes)
}

/// Where and how to reach a broker: rumqttc's address, port and transport.
struct Address {
    broker: String,
    port: u16,
    transport: Transport,
}

fn address(endpoint: &Endpoint, url: &str) -> Result<Address, OptionsError> {
    let parsed = url::Url::parse(url).map_err(OptionsError::Url)?;
    let host = parsed.host_str().ok_or(OptionsError::NoHost)?.to_owned();
    let scheme = parsed.scheme();
    let default_port = crate::vocab::default_port(scheme)
        .ok_or_else(|| OptionsError::Scheme(scheme.to_owned()))?;
    let port = parsed.port().unwrap_or(default_port);
    let transport = match scheme {
        "mqtt" => Transport::tcp(),
        "ws" => Transport::ws(),
        _ => {
            if matches!(endpoint.tls, TlsTrust::InsecureSkipVerify) {
                tracing::warn!(
                    client_id = %endpoint.client_id,
                    host = %host,
                    "TLS certificate verification is OFF for this connection (insecureSkipTlsVerify): the broker is not authenticated"
                );
            }
            let config = TlsConfiguration::Rustls(super::tls::client_config(&endpoint.tls)?);
            if scheme == "mqtts" {
                Transport::tls_with_config(config)
            } else {
                Transport::wss_with_config(config)
            }
        }
    };
    Ok(Address {
        // rumqttc takes the whole URL as the address of a WebSocket broker.
        broker: if matches!(scheme, "ws" | "wss") {
            url.to_owned()
        } else {
            host
        },
        port,
        transport,
    })
}

/// The largest packet taken in, for messages of up to `read_limit` payload bytes.
fn incoming_limit(read_limit: usize) -> usize {
    read_limit
        .saturating_add(PUBLISH_OVERHEAD)
        .min(MQTT_MAX_REMAINING)
}

/// The largest packet written: a message of the side's largest size.
fn outgoing_limit(endpoint: &Endpoint) -> usize {
    endpoint
        .max_message_bytes
        .saturating_add(PUBLISH_OVERHEAD + 5)
        .min(MQTT_MAX_REMAINING + 5)
}

/// [`mqtt_options`] taking in messages of up to `read_limit` payload bytes (raised for one
/// connection to take in, and drop, a message over the side's limit).
pub(super) fn mqtt_options_reading(
    endpoint: &Endpoint,
    url: &str,
    read_limit: usize,
) -> Result<MqttOptions, OptionsError> {
    let Address {
        broker,
        port,
        transport,
    } = address(endpoint, url)?;
    let mut opts = MqttOptions::new(endpoint.client_id.clone(), broker, port);
    opts.set_transport(transport);
    opts.set_keep_alive(endpoint.keep_alive);
    opts.set_clean_session(endpoint.clean_session);
    opts.set_manual_acks(true);
    // Every packet within the limits passes; the relay drops larger messages before rumqttc
    // would refuse them (which would break the connection and bring the message back forever).
    opts.set_max_packet_size(incoming_limit(read_limit), outgoing_limit(endpoint));
    // Our own window bounds what is in flight. rumqttc keeps a slot per packet id up to its
    // inflight setting, so it is kept just above the window rather than at the maximum.
    opts.set_inflight(window_slots(endpoint));
    if let (Some(user), Some(pass)) = (&endpoint.username, &endpoint.password) {
        opts.set_credentials(user.clone(), pass.expose().to_owned());
    } else if let Some(user) = &endpoint.username {
        opts.set_credentials(user.clone(), "");
    }
    Ok(opts)
}

/// How long a broker keeps an MQTT 5 session after the connection ends, when the endpoint
/// keeps sessions (a broker may cap it: AWS IoT Core at 1 hour unless raised).
const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// MQTT 5 options for one connection attempt. The broker learns the largest packet the relay
/// takes in and discards larger messages itself (MQTT 5.0, 3.1.2.11.4), so they are not counted
/// by the relay.
pub(super) fn mqtt5_options(
    endpoint: &Endpoint,
    url: &str,
    read_limit: usize,
) -> Result<rumqttc::v5::MqttOptions, OptionsError> {
    let Address {
        broker,
        port,
        transport,
    } = address(endpoint, url)?;
    let mut opts = rumqttc::v5::MqttOptions::new(endpoint.client_id.clone(), broker, port);
    opts.set_transport(transport);
    opts.set_keep_alive(endpoint.keep_alive);
    opts.set_clean_start(endpoint.clean_session);
    if !endpoint.clean_session {
        opts.set_session_expiry_interval(Some(SESSION_EXPIRY_SECS));
    }
    opts.set_manual_acks(true);
    opts.set_max_packet_size(Some(
        u32::try_from(incoming_limit(read_limit)).unwrap_or(u32::MAX),
    ));
    opts.set_outgoing_inflight_upper_limit(window_slots(endpoint));
    if let (Some(user), Some(pass)) = (&endpoint.username, &endpoint.password) {
        opts.set_credentials(user.clone(), pass.expose().to_owned());
    } else if let Some(user) = &endpoint.username {
        opts.set_credentials(user.clone(), "");
    }
    Ok(opts)
}

/// A client and event loop for one connection attempt, in the endpoint's protocol. `queue`
/// bounds the MQTT 5 client's request queue (a 3.1.1 connection's queue is unbounded; what
/// is in it is bounded by the window and the packet ids the broker has in flight).
pub(super) fn connect(
    endpoint: &Endpoint,
    url: &str,
    read_limit: usize,
    queue: usize,
) -> Result<(Client, EventLoop), OptionsError> {
    Ok(match endpoint.protocol {
        Protocol::V311 => {
            let (c, l) = Lean::new(
                mqtt_options_reading(endpoint, url, read_limit)?,
                endpoint.read_linger,
                outgoing_limit(endpoint),
            );
            (Client::V4(c), EventLoop::V4(l))
        }
        Protocol::V5 => {
            let (c, l) =
                rumqttc::v5::AsyncClient::new(mqtt5_options(endpoint, url, read_limit)?, queue);
            (Client::V5(c), EventLoop::V5(Box::new(l)))
        }
    })
}

/// Packet-id slots for rumqttc: the relay window plus headroom.
/// A connection that never publishes (no route writes to its side) gets a single slot.
fn window_slots(endpoint: &Endpoint) -> u16 {
    if endpoint.window == 0 {
        return 1;
    }
    u16::try_from(endpoint.window + 16)
        .unwrap_or(u16::MAX / 2)
        .min(u16::MAX / 2)
}

/// Error text with anything secret cut out: query strings of URLs (presigned signatures and
/// tokens) and the password.
pub fn redact(text: &str, endpoint: &Endpoint) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(q) = rest.find('?') {
        out.push_str(&rest[..q]);
        out.push_str("?<redacted>");
        let end = rest[q..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ')')
            .map_or(rest.len(), |e| q + e);
        rest = &rest[end..];
    }
    out.push_str(rest);
    if let Some(p) = &endpoint.password
        && !p.expose().is_empty()
    {
        out = out.replace(p.expose(), "<redacted>");
    }
    out
}

/// The read limit of a normal connection, as a remaining length.
pub(super) fn read_limit_packet(endpoint: &Endpoint) -> usize {
    endpoint.max_message_bytes.saturating_add(PUBLISH_OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_query_strings_and_passwords() {
        let mut ep = Endpoint::new("wss://h/mqtt", "c");
        ep.password = Some(crate::vocab::Secret::new("hunter2"));
        let text = "failed: wss://h/mqtt?X-Amz-Signature=abc&X-Amz-Security-Token=xyz (401) password hunter2";
        let r = redact(text, &ep);
        assert!(
            !r.contains("abc") && !r.contains("xyz") && !r.contains("hunter2"),
            "{r}"
        );
        assert!(r.contains("wss://h/mqtt?<redacted>"), "{r}");
        assert!(r.contains("(401)"), "{r}");
    }

    #[test]
    fn options_from_urls() {
        let ep = Endpoint::new("mqtt://broker:1884", "c1");
        let o = mqtt_options(&ep, &ep.url).unwrap();
        assert_eq!(o.broker_address(), ("broker".to_owned(), 1884));
        let o = mqtt_options(&ep, "ws://broker:8080/mqtt").unwrap();
        assert_eq!(
            o.broker_address(),
            ("ws://broker:8080/mqtt".to_owned(), 8080)
        );
        assert!(mqtt_options(&ep, "http://x").is_err());
    }
}
