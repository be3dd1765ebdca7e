//! MQTT test clients (rumqttc): a collecting subscriber that survives broker restarts, and a
//! publisher that waits for every PUBACK.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

fn options(port: u16, client_id: &str, persistent: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(!persistent);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(200);
    o
}

/// Subscribes and collects every message; reconnects (and resubscribes when the session is
/// gone) after broker restarts.
pub struct Collector {
    pub messages: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(port: u16, client_id: &str, filter: &str, persistent: bool) -> Self {
        let (client, mut eventloop) = AsyncClient::new(options(port, client_id, persistent), 1000);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let sink = messages.clone();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                        } else if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        sink.lock().unwrap().push(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscriber ready in time")
            .expect("subscribed");
        Self { messages, task }
    }

    pub fn count(&self) -> usize {
        self.messages.lock().unwrap().len()
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.messages.lock().unwrap().clone()
    }

    /// Distinct (topic, payload) pairs received.
    pub fn distinct(&self) -> usize {
        let m = self.messages.lock().unwrap();
        m.iter()
            .map(|r| (&r.topic, &r.payload))
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Waits until at least `n` distinct messages arrived (duplicates do not count).
    pub async fn wait_for_distinct(&self, n: usize, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.distinct() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.distinct() >= n
    }

    /// Waits until at least `n` messages arrived; returns whether they did.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.count() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count() >= n
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The topics a persistent session of `client_id` holds queued: connects as that client without
/// subscribing (the session's own subscriptions deliver), waits up to 10 s for a first message,
/// then 500 ms for more. Empty when nothing came.
pub async fn queued_topics(port: u16, client_id: &str) -> Vec<String> {
    let session = Collector::start(port, client_id, "none/#", true).await;
    if session.wait_for(1, Duration::from_secs(10)).await {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    session.snapshot().into_iter().map(|r| r.topic).collect()
}

/// Whether the broker at `port` keeps a session for `client_id`: connects as that client
/// (MQTT 3.1.1, clean session off) and reads the CONNACK's session-present flag. The probe
/// leaves a session behind (an empty one if there was none).
pub async fn session_present(port: u16, client_id: &str) -> bool {
    let (client, mut eventloop) = AsyncClient::new(options(port, client_id, true), 10);
    let present = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => break ack.session_present,
                Ok(_) => {}
                Err(e) => panic!("probing the session of {client_id}: {e}"),
            }
        }
    })
    .await
    .expect("a CONNACK within 10 s");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    present
}

/// A message to publish: topic, payload, retain.
pub type Outgoing = (String, Vec<u8>, bool);

/// Publishes every message with `qos` and returns once the broker acknowledged all of them
/// (QoS 1) or they were written (QoS 0).
pub async fn publish_all(
    port: u16,
    client_id: &str,
    messages: Vec<(String, Vec<u8>, bool)>,
    qos: QoS,
) {
    let (client, mut eventloop) = AsyncClient::new(options(port, client_id, false), 1000);
    let n = messages.len();
    let publisher = tokio::spawn(async move {
        for (topic, payload, retain) in messages {
            client
                .publish(topic, qos, retain, payload)
                .await
                .expect("queued");
        }
        client
    });
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while done < n {
        assert!(
            Instant::now() < deadline,
            "publishing timed out after {done} of {n}"
        );
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) if qos == QoS::AtLeastOnce => done += 1,
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))) if qos == QoS::AtMostOnce => {
                done += 1
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher connection failed: {e}"),
            Err(_) => panic!("publisher stalled after {done} of {n}"),
        }
    }
    let client = publisher.await.expect("publisher task");
    let _ = client.disconnect().await;
    // Until the DISCONNECT is written: everything queued before it (QoS 0 publishes reported
    // as written may still sit in the write buffer) has gone out by then.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
}
