//! The byte stream of an MQTT 3.1.1 connection over TCP or TLS, owned by the relay's loop.
//!
//! rumqttc reads and writes through tokio-util's `Framed`, whose buffers are 8 KiB: a read
//! system call takes in at most 8 KiB, and a write buffer holding 8 KiB is written out before
//! the next packet is added. With 4 KiB messages that is one read and one write per two
//! messages, whatever the batch. This wire reads into a buffer that grows while reads fill it
//! (up to [`MAX_READ`]) and writes a round's packets with one system call. Payloads of
//! [`BY_REFERENCE`] bytes or more are not copied into the write buffer: the call writes them
//! from where they were read (a vectored write). The relay's own publishes and acknowledgements
//! are encoded here ([`Out`]), not through rumqttc's packet types. WebSocket connections keep
//! rumqttc's stream.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet, Publish};
use rumqttc::{ConnectionError, Incoming, MqttOptions, StateError, TlsConfiguration, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The least room a read is given (rumqttc's figure).
const MIN_READ: usize = 8 * 1024;
/// The most room a read is given: 64 messages of 4 KiB.
const MAX_READ: usize = 256 * 1024;
/// Packets queued to write holding this much are written out before another is added.
const WRITE_HIGH: usize = 1024 * 1024;
/// Payloads this large or larger are written from where they are instead of being copied into
/// the write buffer: below it, copying costs less than another slice of the vectored write.
const BY_REFERENCE: usize = 1024;
/// Room taken at once for the heads of publishes whose payloads are written by reference.
const HEADS_ROOM: usize = 4096;
/// The largest remaining length MQTT can encode (four bytes of seven bits).
const MAX_REMAINING: usize = 268_435_455;
/// The most slices one vectored write is given (Linux takes up to 1024).
const MAX_SLICES: usize = 64;
/// A write buffer that grew past this is let go once written, so an idle connection does not
/// keep a burst's memory.
const WRITE_KEEP: usize = 64 * 1024;
/// The size of each buffer rendered topics are copied into ([`Topic::copied_into`]).
const TOPIC_ARENA: usize = 4096;

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
    /// Encoded bytes not yet cut into [`Wire::parts`].
    write: BytesMut,
    /// What to write before [`Wire::write`], in order: cut from it, and payloads written by
    /// reference.
    parts: VecDeque<Bytes>,
    /// Bytes queued in `parts` and `write`.
    queued: usize,
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
        let mut wire = Wire::over(stream, options.max_packet_size(), max_outgoing);
        let mut connect = Connect::new(options.client_id());
        connect.keep_alive = u16::try_from(options.keep_alive().as_secs()).unwrap_or(u16::MAX);
        connect.clean_session = options.clean_session();
        connect.last_will = options.last_will();
        connect.login = options.credentials();
        wire.write(Packet::Connect(connect)).await?;
        wire.flush().await?;
        match wire.read().await?.into_incoming() {
            Incoming::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok((wire, ack)),
            Incoming::ConnAck(ack) => Err(ConnectionError::ConnectionRefused(ack.code)),
            other => Err(ConnectionError::NotConnAck(other)),
        }
    }

    /// A wire over a connected stream.
    fn over(stream: Box<dyn Io>, max_incoming: usize, max_outgoing: usize) -> Wire {
        Wire {
            stream,
            read: BytesMut::with_capacity(MIN_READ),
            room: MIN_READ,
            write: BytesMut::new(),
            parts: VecDeque::new(),
            queued: 0,
            max_incoming,
            max_outgoing,
        }
    }

    /// The next packet: a QoS 0 or 1 PUBLISH and a PUBACK as the relay takes them ([`Read`]),
    /// any other as rumqttc reads it. Cancel-safe: a read that did not finish leaves what
    /// arrived in the buffer.
    pub(super) async fn read(&mut self) -> Result<Read, StateError> {
        loop {
            match rumqttc::mqttbytes::check(self.read.iter(), self.max_incoming) {
                Ok(header) => {
                    return take(&mut self.read, header.frame_length(), self.max_incoming);
                }
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

    /// Queues a packet to write (what is queued is written out first if it holds
    /// [`WRITE_HIGH`]).
    pub(super) async fn write(&mut self, packet: Packet) -> Result<(), StateError> {
        self.put(Out::Packet(Box::new(packet))).await
    }

    /// Queues what the loop writes (what is queued is written out first if it holds
    /// [`WRITE_HIGH`]).
    pub(super) async fn put(&mut self, out: Out) -> Result<(), StateError> {
        if self.queued >= WRITE_HIGH {
            self.flush().await?;
        }
        self.queued += match out {
            Out::Publish(p) => {
                let by_reference = p.payload.len() >= BY_REFERENCE;
                let size = publish_head(&p, by_reference, &mut self.write, self.max_outgoing)?;
                if by_reference {
                    self.parts.push_back(self.write.split().freeze());
                    self.parts.push_back(p.payload);
                } else {
                    self.write.extend_from_slice(&p.payload);
                }
                size
            }
            Out::PubAck(pkid) => {
                self.write.put_slice(&[0x40, 0x02]);
                self.write.put_u16(pkid);
                4
            }
            Out::Packet(packet) => packet.write(&mut self.write, self.max_outgoing)?,
        };
        Ok(())
    }

    /// Writes out what is queued, with as few system calls as it takes. Cancel-safe: what was
    /// written is gone from the queue.
    pub(super) async fn flush(&mut self) -> Result<(), StateError> {
        if !self.write.is_empty() {
            self.parts.push_back(self.write.split().freeze());
        }
        while !self.parts.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = self
                .parts
                .iter()
                .zip(slices.iter_mut())
                .map(|(part, slice)| *slice = IoSlice::new(part))
                .count();
            let written = self.stream.write_vectored(&slices[..count]).await?;
            if written == 0 {
                return Err(StateError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            consume(&mut self.parts, written);
        }
        self.queued = 0;
        // TLS keeps records it could not write yet until flushed (a no-op on plain TCP).
        self.stream.flush().await?;
        if self.write.capacity() > WRITE_KEEP {
            self.write = BytesMut::new();
        }
        Ok(())
    }
}

/// A topic as read from a broker: UTF-8, kept in the bytes it was read into (no copy per
/// message).
#[derive(Clone, PartialEq, Eq)]
pub struct Topic(bytestring::ByteString);

impl Topic {
    /// The topic in `bytes`, if they are UTF-8.
    pub fn new(bytes: Bytes) -> Result<Topic, std::str::Utf8Error> {
        bytestring::ByteString::try_from(bytes).map(Topic)
    }

    /// The topic in `bytes`, with what is not UTF-8 replaced (U+FFFD).
    pub fn lossy(bytes: Bytes) -> Topic {
        match Topic::new(bytes.clone()) {
            Ok(topic) => topic,
            Err(_) => Topic::from(String::from_utf8_lossy(&bytes).into_owned()),
        }
    }

    /// A copy of `topic` in `arena`, which one allocation serves for many topics: a topic
    /// made from a `String` would cost one allocation when made and another when first shared
    /// (`bytes` promotes a vector to a shared buffer on its first clone).
    pub fn copied_into(arena: &mut BytesMut, topic: &str) -> Topic {
        if arena.capacity() - arena.len() < topic.len() {
            *arena = BytesMut::with_capacity(TOPIC_ARENA.max(topic.len()));
        }
        arena.extend_from_slice(topic.as_bytes());
        let bytes = arena.split().freeze();
        // Never fails: the bytes are a `str`'s.
        Topic::new(bytes).unwrap_or_else(|_| Topic::from(topic))
    }

    /// Checked once, when made (`bytestring`), not on every use.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Topic {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for Topic {
    fn from(topic: String) -> Topic {
        Topic(topic.into())
    }
}

impl From<&str> for Topic {
    fn from(topic: &str) -> Topic {
        Topic(topic.into())
    }
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QoS 0 or 1 publish as read: its topic and payload stay in the bytes they were read into
/// (the topic checked as UTF-8 once, not copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPublish {
    pub topic: Topic,
    pub pkid: u16,
    pub qos: rumqttc::QoS,
    pub retain: bool,
    pub payload: Bytes,
}

/// A packet read: the two the relay reads for every message, small to move, or any other as
/// rumqttc has it (rare: CONNACK, SUBACK, PINGRESP, QoS 2; boxed). Made by the wire or by
/// `Read::from`, so a `Packet` is never a QoS 0 or 1 PUBLISH nor a PUBACK.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Read {
    Publish(InPublish),
    PubAck(u16),
    Packet(Box<Incoming>),
}

impl From<Incoming> for Read {
    /// From rumqttc's stream (WebSocket): its publishes and acknowledgements as the wire reads
    /// them (the topic's bytes taken over, not copied).
    fn from(packet: Incoming) -> Read {
        match packet {
            Incoming::Publish(p) if p.qos != rumqttc::QoS::ExactlyOnce => {
                Read::Publish(InPublish {
                    topic: Topic::from(p.topic),
                    pkid: p.pkid,
                    qos: p.qos,
                    retain: p.retain,
                    payload: p.payload,
                })
            }
            Incoming::PubAck(a) => Read::PubAck(a.pkid),
            other => Read::Packet(Box::new(other)),
        }
    }
}

impl Read {
    /// rumqttc's form.
    pub(super) fn into_incoming(self) -> Incoming {
        match self {
            Read::Publish(p) => {
                let mut publish = Publish::from_bytes(p.topic.as_str(), p.qos, p.payload);
                publish.pkid = p.pkid;
                publish.retain = p.retain;
                Incoming::Publish(publish)
            }
            Read::PubAck(pkid) => Incoming::PubAck(rumqttc::mqttbytes::v4::PubAck::new(pkid)),
            Read::Packet(packet) => *packet,
        }
    }
}

/// Takes the packet of `frame` bytes at the start of `buf` (which holds all of it). A QoS 0 or
/// 1 PUBLISH and a PUBACK are read here, as rumqttc would read them but with no copy of the
/// topic; the rest by rumqttc.
fn take(buf: &mut BytesMut, frame: usize, max: usize) -> Result<Read, StateError> {
    let byte1 = buf.first().copied().unwrap_or_default();
    match byte1 >> 4 {
        3 if (byte1 >> 1) & 0b11 < 2 => {
            let packet = buf.split_to(frame).freeze();
            Ok(Read::Publish(read_publish(byte1, packet)?))
        }
        4 if frame == 4 => {
            let mut packet = buf.split_to(frame);
            packet.advance(2);
            Ok(Read::PubAck(packet.get_u16()))
        }
        // Through `Read::from`, as rumqttc's stream: a PUBACK of a longer encoding is still one.
        _ => Ok(Read::from(Packet::read(buf, max)?)),
    }
}

/// A QoS 0 or 1 PUBLISH framed by rumqttc's `check` (`packet` is all of it), with rumqttc's
/// errors for what it refuses.
fn read_publish(byte1: u8, mut packet: Bytes) -> Result<InPublish, rumqttc::mqttbytes::Error> {
    use rumqttc::mqttbytes::Error;
    let qos = if (byte1 >> 1) & 0b11 == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    };
    // The fixed header: the first byte and the remaining length, one to four bytes with the
    // top bit set on all but the last (`check` read it already).
    let mut header = 2;
    while header < 5 && packet.get(header - 1).is_some_and(|b| b & 0x80 != 0) {
        header += 1;
    }
    if packet.len() < header + 2 {
        return Err(Error::MalformedPacket);
    }
    packet.advance(header);
    let len = usize::from(packet.get_u16());
    if len > packet.len() {
        return Err(Error::BoundaryCrossed(len));
    }
    let topic = Topic::new(packet.split_to(len)).map_err(|_| Error::TopicNotUtf8)?;
    let pkid = if qos == rumqttc::QoS::AtLeastOnce {
        if packet.len() < 2 {
            return Err(Error::MalformedPacket);
        }
        match packet.get_u16() {
            0 => return Err(Error::PacketIdZero),
            pkid => pkid,
        }
    } else {
        0
    };
    Ok(InPublish {
        topic,
        pkid,
        qos,
        retain: byte1 & 1 != 0,
        payload: packet,
    })
}

/// A publish of the relay's to a 3.1.1 broker. Small to move through the loop's queue, and its
/// topic is shared with the copy the relay keeps until the broker acknowledges it (no copy of
/// the topic per attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOut {
    pub topic: Topic,
    pub payload: Bytes,
    pub qos: rumqttc::QoS,
    pub retain: bool,
    /// 0 until the loop gives a QoS 1 publish its id.
    pub pkid: u16,
}

impl PublishOut {
    /// rumqttc's form, for the streams it writes (WebSocket).
    pub(super) fn into_rumqttc(self) -> Publish {
        let mut p = Publish::from_bytes(&*self.topic, self.qos, self.payload);
        p.retain = self.retain;
        p.pkid = self.pkid;
        p
    }
}

/// What the loop writes: a publish or an acknowledgement of the relay's, as they are, or a
/// packet rumqttc's session state made (rare: subscriptions, pings, QoS 2; boxed, so that the
/// common two stay small to move).
pub(super) enum Out {
    Publish(PublishOut),
    PubAck(u16),
    Packet(Box<Packet>),
}

impl Out {
    /// rumqttc's form, for the streams it writes (WebSocket).
    pub(super) fn into_packet(self) -> Packet {
        match self {
            Out::Publish(p) => Packet::Publish(p.into_rumqttc()),
            Out::PubAck(pkid) => Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(pkid)),
            Out::Packet(packet) => *packet,
        }
    }
}

/// Encodes the fixed and variable header of a 3.1.1 PUBLISH into `out`, as rumqttc's
/// `Publish::write` does, with room for the payload after it unless it goes `by_reference`;
/// returns the packet's size. A packet larger than `max` is refused as rumqttc refuses it,
/// before anything is encoded.
fn publish_head(
    publish: &PublishOut,
    by_reference: bool,
    out: &mut BytesMut,
    max: usize,
) -> Result<usize, StateError> {
    let PublishOut {
        qos,
        retain,
        topic,
        pkid,
        payload,
    } = publish;
    let with_id = *qos != rumqttc::QoS::AtMostOnce;
    if with_id && *pkid == 0 {
        return Err(rumqttc::mqttbytes::Error::PacketIdZero.into());
    }
    let topic_len =
        u16::try_from(topic.len()).map_err(|_| rumqttc::mqttbytes::Error::PayloadTooLong)?;
    let mut remaining = 2 + topic.len() + payload.len() + if with_id { 2 } else { 0 };
    if remaining > MAX_REMAINING {
        return Err(rumqttc::mqttbytes::Error::PayloadTooLong.into());
    }
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    let size = 1 + length_bytes + remaining;
    if size > max {
        return Err(rumqttc::mqttbytes::Error::OutgoingPacketTooLarge {
            pkt_size: size,
            max,
        }
        .into());
    }
    // Room for many heads at once: each written head is cut off the buffer, and a buffer
    // whose parts are still queued is taken anew, at this size, when it runs out.
    let room = if by_reference {
        size - payload.len()
    } else {
        size
    };
    if out.capacity() - out.len() < room {
        out.reserve(room.max(HEADS_ROOM));
    }
    // The relay sends again as a new publish (DUP clear), never as a retransmission.
    out.put_u8(0b0011_0000 | u8::from(*retain) | ((*qos as u8) << 1));
    // The remaining length: seven bits a byte, low first, the top bit set on all but the last.
    loop {
        let mut byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if remaining == 0 {
            break;
        }
    }
    out.put_u16(topic_len);
    out.extend_from_slice(topic.as_bytes());
    if with_id {
        out.put_u16(*pkid);
    }
    Ok(size)
}

/// Drops the first `written` bytes of `parts`.
fn consume(parts: &mut VecDeque<Bytes>, mut written: usize) {
    while written > 0 {
        let Some(first) = parts.front_mut() else {
            return;
        };
        if first.len() > written {
            first.advance(written);
            return;
        }
        written -= first.len();
        parts.pop_front();
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

    fn publish(qos: rumqttc::QoS, topic: &str, payload: usize, pkid: u16) -> PublishOut {
        PublishOut {
            topic: topic.into(),
            payload: vec![0xa5; payload].into(),
            qos,
            retain: false,
            pkid,
        }
    }

    #[test]
    fn a_publish_head_and_its_payload_are_what_rumqttc_encodes() {
        use rumqttc::QoS::{AtLeastOnce, AtMostOnce, ExactlyOnce};
        // Remaining lengths on both sides of each length byte (127/128, 16383/16384,
        // 2097151/2097152), every QoS, flags, and topics empty to long.
        let long = "t/".repeat(300);
        for (qos, pkid) in [(AtMostOnce, 0), (AtLeastOnce, 7), (ExactlyOnce, 65535)] {
            for topic in ["", "a/b", long.as_str()] {
                let head = 2 + topic.len() + if pkid > 0 { 2 } else { 0 };
                for remaining in [127usize, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
                    let Some(payload) = remaining.checked_sub(head) else {
                        continue;
                    };
                    for retain in [false, true] {
                        let mut p = publish(qos, topic, payload, pkid);
                        p.retain = retain;
                        let mut expected = BytesMut::new();
                        p.clone()
                            .into_rumqttc()
                            .write(&mut expected)
                            .expect("rumqttc encodes it");
                        for by_reference in [false, true] {
                            let mut ours = BytesMut::new();
                            let size = publish_head(&p, by_reference, &mut ours, usize::MAX)
                                .expect("encodes");
                            ours.extend_from_slice(&p.payload);
                            assert_eq!(size, expected.len(), "the size is the packet's");
                            assert_eq!(
                                ours, expected,
                                "QoS {qos:?}, topic {topic:?}, remaining {remaining}"
                            );
                        }
                    }
                }
            }
        }
        let mut out = BytesMut::new();
        assert!(
            publish_head(
                &publish(AtLeastOnce, "a", 10, 0),
                true,
                &mut out,
                usize::MAX
            )
            .is_err()
        );
    }

    /// Reads the one packet in `bytes` as the wire does.
    fn take_all(bytes: &[u8]) -> Result<Read, StateError> {
        let mut buf = BytesMut::from(bytes);
        let header = rumqttc::mqttbytes::check(buf.iter(), usize::MAX).expect("framed");
        let read = take(&mut buf, header.frame_length(), usize::MAX);
        assert!(buf.is_empty() || read.is_err(), "the packet is taken whole");
        read
    }

    #[test]
    fn publishes_and_acknowledgements_read_as_rumqttc_reads_them() {
        use rumqttc::QoS::{AtLeastOnce, AtMostOnce, ExactlyOnce};
        let long = "t/".repeat(300);
        for (qos, pkid) in [(AtMostOnce, 0), (AtLeastOnce, 7), (ExactlyOnce, 65535)] {
            for topic in ["", "a/b", "ünï/cødé", long.as_str()] {
                for payload in [0, 1, 100, 16_400] {
                    for retain in [false, true] {
                        let mut p = publish(qos, topic, payload, pkid).into_rumqttc();
                        p.retain = retain;
                        p.dup = pkid == 7;
                        let mut bytes = BytesMut::new();
                        p.write(&mut bytes).expect("rumqttc encodes it");
                        let expected =
                            Packet::read(&mut bytes.clone(), usize::MAX).expect("rumqttc reads it");
                        let read = take_all(&bytes).expect("read");
                        // QoS 2 is rumqttc's to read (its state answers with PUBREC).
                        assert_eq!(
                            matches!(read, Read::Packet(_)),
                            qos == ExactlyOnce,
                            "QoS {qos:?}"
                        );
                        let mut got = read.into_incoming();
                        if let (Packet::Publish(g), Packet::Publish(e)) = (&mut got, &expected) {
                            // The relay does not carry DUP (it sends again as a new publish).
                            g.dup = e.dup;
                        }
                        assert_eq!(got, expected, "QoS {qos:?}, topic {topic:?}, {payload} B");
                    }
                }
            }
        }
        assert_eq!(
            take_all(&[0x40, 0x02, 0x01, 0x02]).expect("read"),
            Read::PubAck(258)
        );
    }

    #[test]
    fn a_malformed_publish_is_refused_with_rumqttc_errors() {
        use rumqttc::mqttbytes::Error;
        let refused = |bytes: &[u8]| match take_all(bytes) {
            Err(StateError::Deserialization(e)) => e,
            other => panic!("{bytes:?} read as {other:?}"),
        };
        // Topic "a\xff": not UTF-8.
        assert!(matches!(
            refused(&[0x30, 0x05, 0, 2, b'a', 0xff, b'x']),
            Error::TopicNotUtf8
        ));
        // QoS 1 with packet id 0.
        assert!(matches!(
            refused(&[0x32, 0x05, 0, 1, b'a', 0, 0]),
            Error::PacketIdZero
        ));
        // A topic longer than the packet.
        assert!(matches!(
            refused(&[0x30, 0x03, 0, 9, b'a']),
            Error::BoundaryCrossed(9)
        ));
        // QoS 1 with no room for its packet id.
        assert!(matches!(
            refused(&[0x32, 0x04, 0, 1, b'a', 0]),
            Error::MalformedPacket
        ));
        // No topic length.
        assert!(matches!(refused(&[0x30, 0x01, 0]), Error::MalformedPacket));
    }

    #[test]
    fn a_topic_is_utf8_checked_once_and_kept_where_it_was_read() {
        let bytes = Bytes::from_static("ünï/cødé".as_bytes());
        let topic = Topic::new(bytes.clone()).expect("UTF-8");
        assert_eq!(topic.as_str(), "ünï/cødé");
        assert_eq!(topic.as_str().as_ptr(), bytes.as_ptr(), "not copied");
        assert!(Topic::new(Bytes::from_static(b"a\xff")).is_err());
        assert_eq!(
            Topic::lossy(Bytes::from_static(b"a\xff")).as_str(),
            "a\u{fffd}"
        );
        assert_eq!(Topic::lossy(bytes).as_str(), "ünï/cødé");
    }

    #[test]
    fn rendered_topics_share_an_arena_and_outlive_it() {
        let mut arena = BytesMut::new();
        let first = Topic::copied_into(&mut arena, "out/a/b");
        let second = Topic::copied_into(&mut arena, "out/ünï");
        assert_eq!((first.as_str(), second.as_str()), ("out/a/b", "out/ünï"));
        // One buffer holds both, one after the other.
        let end = first.as_str().as_ptr().wrapping_add(first.len());
        assert_eq!(second.as_str().as_ptr(), end);
        // A topic that does not fit gets a buffer of its own; the earlier ones keep theirs.
        let long = "x".repeat(TOPIC_ARENA + 1);
        let third = Topic::copied_into(&mut arena, &long);
        assert_eq!(third.as_str(), long);
        // Filling the arena starts a new one; what was handed out is unchanged.
        let many: Vec<Topic> = (0..1000)
            .map(|i| Topic::copied_into(&mut arena, &format!("t/{i}")))
            .collect();
        drop(arena);
        assert!(
            many.iter()
                .enumerate()
                .all(|(i, t)| t.as_str() == format!("t/{i}"))
        );
        assert_eq!((first.as_str(), second.as_str()), ("out/a/b", "out/ünï"));
        // Shared without a copy.
        assert_eq!(first.clone().as_str().as_ptr(), first.as_str().as_ptr());
    }

    #[test]
    fn consuming_drops_whole_parts_and_advances_into_the_next() {
        let mut parts: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fghi"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        consume(&mut parts, 4);
        assert_eq!(parts, [&b"e"[..], b"fghi"]);
        consume(&mut parts, 1);
        assert_eq!(parts, [&b"fghi"[..]]);
        consume(&mut parts, 4);
        assert!(parts.is_empty());
        consume(&mut parts, 3);
        assert!(parts.is_empty());
    }

    /// Packets of every size, written by reference and by copy in one queue, through a pipe
    /// that takes a few bytes per write, arrive whole, in order, as rumqttc reads them.
    #[tokio::test]
    async fn packets_written_in_pieces_arrive_whole_and_in_order() {
        let (near, mut far) = tokio::io::duplex(1000);
        let mut wire = Wire::over(Box::new(near), 1 << 20, 1 << 20);
        let sizes = [0, 10, BY_REFERENCE - 1, BY_REFERENCE, 3000, 70_000, 5, 5000];
        let sent: Vec<PublishOut> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                publish(
                    rumqttc::QoS::AtLeastOnce,
                    &format!("t/{i}"),
                    size,
                    i as u16 + 1,
                )
            })
            .collect();
        let expected: Vec<Packet> = sent
            .iter()
            .flat_map(|p| {
                [
                    Packet::Publish(p.clone().into_rumqttc()),
                    Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid)),
                ]
            })
            .collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = BytesMut::new();
            while got.len() < 16 {
                match Packet::read(&mut buf, 1 << 20) {
                    Ok(packet) => got.push(packet),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                        let n = far.read_buf(&mut buf).await.expect("reads");
                        assert!(n > 0, "the pipe closed early");
                    }
                    Err(e) => panic!("not a packet: {e}"),
                }
            }
            got
        });
        for p in sent {
            let pkid = p.pkid;
            wire.put(Out::Publish(p)).await.expect("queued");
            wire.put(Out::PubAck(pkid)).await.expect("queued");
        }
        wire.flush().await.expect("written");
        assert!(wire.parts.is_empty() && wire.write.is_empty());
        assert_eq!(reader.await.expect("reader"), expected);
    }

    #[tokio::test]
    async fn a_publish_over_the_limit_is_refused_by_reference_too() {
        let (near, _far) = tokio::io::duplex(1000);
        let mut wire = Wire::over(Box::new(near), 1 << 20, 500);
        for size in [600, 5000] {
            let p = publish(rumqttc::QoS::AtLeastOnce, "t", size, 1);
            assert!(matches!(
                wire.put(Out::Publish(p)).await,
                Err(StateError::Deserialization(
                    rumqttc::mqttbytes::Error::OutgoingPacketTooLarge { max: 500, .. }
                ))
            ));
            assert!(wire.parts.is_empty() && wire.write.is_empty());
        }
    }
}
