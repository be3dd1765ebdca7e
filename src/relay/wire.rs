//! The byte stream of an MQTT 3.1.1 connection over TCP or TLS, owned by the relay's loop.
//!
//! rumqttc reads and writes through tokio-util's `Framed`, whose buffers are 8 KiB: a read
//! system call takes in at most 8 KiB, and a write buffer holding 8 KiB is written out before
//! the next packet is added. With 4 KiB messages that is one read and one write per two
//! messages, whatever the batch. This wire reads into a buffer that grows while reads fill it
//! (up to [`MAX_READ`]) and writes a round's packets with one system call. WebSocket
//! connections keep rumqttc's stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::{ConnectionError, Incoming, MqttOptions, StateError, TlsConfiguration, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The least room a read is given (rumqttc's figure).
const MIN_READ: usize = 8 * 1024;
/// The most room a read is given: 64 messages of 4 KiB.
const MAX_READ: usize = 256 * 1024;
/// A write buffer holding this much is written out before another packet is added.
const WRITE_HIGH: usize = 1024 * 1024;
/// A write buffer that grew past this is let go once written, so an idle connection does not
/// keep a burst's memory.
const WRITE_KEEP: usize = 64 * 1024;

/// Room for the next read, from the last one: it took in `read` bytes of the `spare` it had,
/// and `room` was the target. Doubled (up to [`MAX_READ`]) after a read that filled what it
/// had (more was waiting), halved (down to [`MIN_READ`]) after one that used less than a
/// quarter of the target, kept otherwise.
pub(super) fn next_room(room: usize, spare: usize, read: usize) -> usize {
    if read >= spare {
        (room * 2).min(MAX_READ)
    } else if read < room / 4 {
        (room / 2).max(MIN_READ)
    } else {
        room
    }
}

/// What the wire runs over, from rumqttc's transport: `None` for a WebSocket, which keeps
/// rumqttc's stream.
pub(super) fn layer(transport: &Transport) -> Option<Layer> {
    match transport {
        Transport::Tcp => Some(Layer::Plain),
        Transport::Tls(TlsConfiguration::Rustls(config)) => Some(Layer::Tls(config.clone())),
        _ => None,
    }
}

/// Plain TCP, or TLS over it.
pub(super) enum Layer {
    Plain,
    Tls(Arc<rustls::ClientConfig>),
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connected MQTT 3.1.1 stream: packets in and out, with the relay's buffers.
pub(super) struct Wire {
    stream: Box<dyn Io>,
    read: BytesMut,
    /// Room to give the next read (see [`next_room`]).
    room: usize,
    write: BytesMut,
    max_incoming: usize,
    max_outgoing: usize,
}

impl Wire {
    /// Connects to the broker of `options` over `layer` and makes the MQTT connection
    /// (CONNECT, CONNACK), all within `timeout`, as rumqttc does.
    pub(super) async fn connect(
        options: &MqttOptions,
        layer: &Layer,
        max_outgoing: usize,
        timeout: Duration,
    ) -> Result<(Wire, ConnAck), ConnectionError> {
        tokio::time::timeout(timeout, Self::connect_now(options, layer, max_outgoing))
            .await
            .map_err(|_| ConnectionError::NetworkTimeout)?
    }

    async fn connect_now(
        options: &MqttOptions,
        layer: &Layer,
        max_outgoing: usize,
    ) -> Result<(Wire, ConnAck), ConnectionError> {
        let (host, port) = options.broker_address();
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        let stream: Box<dyn Io> = match layer {
            Layer::Plain => Box::new(tcp),
            Layer::Tls(config) => {
                // As rumqttc: the certificate is checked against the URL's host.
                let name = rustls::pki_types::ServerName::try_from(host.as_str())
                    .map_err(|e| ConnectionError::Tls(rumqttc::TlsError::DNSName(e)))?
                    .to_owned();
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ConnectionError::Tls(rumqttc::TlsError::Io(e)))?;
                Box::new(tls)
            }
        };
        let mut wire = Wire {
            stream,
            read: BytesMut::with_capacity(MIN_READ),
            room: MIN_READ,
            write: BytesMut::new(),
            max_incoming: options.max_packet_size(),
            max_outgoing,
        };
        let mut connect = Connect::new(options.client_id());
        connect.keep_alive = u16::try_from(options.keep_alive().as_secs()).unwrap_or(u16::MAX);
        connect.clean_session = options.clean_session();
        connect.last_will = options.last_will();
        connect.login = options.credentials();
        wire.write(Packet::Connect(connect)).await?;
        wire.flush().await?;
        match wire.read().await? {
            Incoming::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok((wire, ack)),
            Incoming::ConnAck(ack) => Err(ConnectionError::ConnectionRefused(ack.code)),
            other => Err(ConnectionError::NotConnAck(other)),
        }
    }

    /// The next packet. Cancel-safe: a read that did not finish leaves what arrived in the
    /// buffer.
    pub(super) async fn read(&mut self) -> Result<Incoming, StateError> {
        loop {
            match Packet::read(&mut self.read, self.max_incoming) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(more)) => {
                    // Room for the rest of this packet, and for what the last reads suggest
                    // follows it; the buffer is refilled only once less than a quarter of that
                    // is left. It is taken anew where messages still hold parts of it (their
                    // payloads point into it until they are delivered), so refilling it for
                    // every small read would allocate for every read.
                    if self.read.capacity() - self.read.len() < more.max(self.room / 4) {
                        self.read.reserve(more.max(self.room));
                    }
                    let spare = self.read.capacity() - self.read.len();
                    let n = self.stream.read_buf(&mut self.read).await?;
                    if n == 0 {
                        return Err(StateError::ConnectionAborted);
                    }
                    self.room = next_room(self.room, spare, n);
                }
                Err(e) => return Err(StateError::Deserialization(e)),
            }
        }
    }

    /// Adds a packet to the write buffer (written out first if it holds [`WRITE_HIGH`]).
    pub(super) async fn write(&mut self, packet: Packet) -> Result<(), StateError> {
        if self.write.len() >= WRITE_HIGH {
            self.flush().await?;
        }
        packet.write(&mut self.write, self.max_outgoing)?;
        Ok(())
    }

    /// Writes out the write buffer. Cancel-safe: what was written is gone from the buffer.
    pub(super) async fn flush(&mut self) -> Result<(), StateError> {
        while !self.write.is_empty() {
            if self.stream.write_buf(&mut self.write).await? == 0 {
                return Err(StateError::Io(std::io::ErrorKind::WriteZero.into()));
            }
        }
        // TLS keeps records it could not write yet until flushed (a no-op on plain TCP).
        self.stream.flush().await?;
        if self.write.capacity() > WRITE_KEEP {
            self.write = BytesMut::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_room_grows_while_reads_fill_it_and_shrinks_when_they_do_not() {
        // A read that filled what it had: more is waiting.
        assert_eq!(next_room(MIN_READ, MIN_READ, MIN_READ), 2 * MIN_READ);
        assert_eq!(next_room(MIN_READ, 3_000, 3_000), 2 * MIN_READ);
        assert_eq!(next_room(MAX_READ, MAX_READ, MAX_READ), MAX_READ);
        // Half of the target: kept.
        assert_eq!(
            next_room(4 * MIN_READ, 4 * MIN_READ, 2 * MIN_READ),
            4 * MIN_READ
        );
        // Little: halved, never below the least.
        assert_eq!(next_room(4 * MIN_READ, 4 * MIN_READ, 100), 2 * MIN_READ);
        assert_eq!(next_room(MIN_READ, MIN_READ, 100), MIN_READ);
    }
}
