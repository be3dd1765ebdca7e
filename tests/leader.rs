//! Leader election hand-over between two replicas sharing one lease, through an in-memory lease
//! store (a fake: no API server runs here), on tokio's paused clock so timings are exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iot_operator::cli::run::run_when_leading;
use iot_operator::controller::leader::{
    LeaseFuture, LeaseRecord, LeaseStore, MemoryLeaseStore, Timing, WriteGate, spawn_elector,
};
use iot_operator::relay::{Endpoint, RelayConfig, RelayManager};
use iot_operator::telemetry::Metrics;
use iot_operator::telemetry::http::Readiness;
use tokio::sync::watch;
use tokio::time::Instant;

/// One replica's view of the shared store; `cut` partitions it from the API server.
struct Replica {
    shared: Arc<MemoryLeaseStore>,
    cut: AtomicBool,
}

impl Replica {
    fn new(shared: &Arc<MemoryLeaseStore>) -> Arc<Self> {
        Arc::new(Self {
            shared: shared.clone(),
            cut: AtomicBool::new(false),
        })
    }
    fn fail<T: Send + 'static>(&self) -> Option<LeaseFuture<'_, T>> {
        self.cut.load(Ordering::SeqCst).then(|| {
            Box::pin(async {
                Err(iot_operator::controller::leader::LeaseError::Store(
                    "partitioned".into(),
                ))
            }) as LeaseFuture<'_, T>
        })
    }
}

impl LeaseStore for Replica {
    fn get(&self) -> LeaseFuture<'_, Option<LeaseRecord>> {
        self.fail().unwrap_or_else(|| self.shared.get())
    }
    fn create(&self, holder: &str) -> LeaseFuture<'_, LeaseRecord> {
        self.fail().unwrap_or_else(|| self.shared.create(holder))
    }
    fn replace(&self, current: &LeaseRecord, holder: &str) -> LeaseFuture<'_, LeaseRecord> {
        self.fail()
            .unwrap_or_else(|| self.shared.replace(current, holder))
    }
}

const TIMING: Timing = Timing {
    duration: Duration::from_secs(15),
    retry: Duration::from_secs(4),
    margin: Duration::from_secs(3),
};

/// Records (time, leader) on every change.
fn record(mut rx: watch::Receiver<bool>) -> Arc<std::sync::Mutex<Vec<(Instant, bool)>>> {
    let log = Arc::new(std::sync::Mutex::new(vec![(Instant::now(), *rx.borrow())]));
    let l = log.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let v = *rx.borrow_and_update();
            l.lock().unwrap().push((Instant::now(), v));
        }
    });
    log
}

fn leader_at(log: &[(Instant, bool)], t: Instant) -> bool {
    log.iter()
        .rev()
        .find(|(at, _)| *at <= t)
        .is_some_and(|(_, v)| *v)
}

#[tokio::test(start_paused = true)]
async fn exactly_one_leader_and_a_partitioned_leader_steps_down_before_takeover() {
    let shared = Arc::new(MemoryLeaseStore::default());
    let (a_store, b_store) = (Replica::new(&shared), Replica::new(&shared));
    let (_stop_tx, stop) = watch::channel(false);
    let (a, _) = spawn_elector(
        a_store.clone(),
        "a".into(),
        TIMING,
        WriteGate::leased(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (b, _) = spawn_elector(
        b_store.clone(),
        "b".into(),
        TIMING,
        WriteGate::leased(),
        stop.clone(),
    );
    let (a_log, b_log) = (record(a.clone()), record(b.clone()));
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(*a.borrow() && !*b.borrow(), "a leads");
    assert_eq!(shared.holder().as_deref(), Some("a"));

    // Partition a from the API server: it must stop leading before b can take over.
    a_store.cut.store(true, Ordering::SeqCst);
    let cut_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let a_log = a_log.lock().unwrap().clone();
    let b_log = b_log.lock().unwrap().clone();
    let a_down = a_log
        .iter()
        .find(|(t, v)| *t >= cut_at && !v)
        .expect("a stepped down")
        .0;
    let b_up = b_log
        .iter()
        .find(|(t, v)| *t >= cut_at && *v)
        .expect("b took over")
        .0;
    assert!(
        a_down < b_up,
        "a stopped at {:?}, b started at {:?}",
        a_down - cut_at,
        b_up - cut_at
    );
    assert!(
        b_up - cut_at <= TIMING.duration + 2 * TIMING.retry,
        "takeover took {:?}",
        b_up - cut_at
    );
    // Never two leaders at once, sampled every 100 ms over the whole run.
    let mut t = start;
    while t < Instant::now() {
        assert!(
            !(leader_at(&a_log, t) && leader_at(&b_log, t)),
            "two leaders at {:?}",
            t - start
        );
        t += Duration::from_millis(100);
    }
    assert_eq!(shared.holder().as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn a_stopping_leader_releases_the_lease_for_a_fast_takeover() {
    let shared = Arc::new(MemoryLeaseStore::default());
    let (a_stop_tx, a_stop) = watch::channel(false);
    let (_b_stop_tx, b_stop) = watch::channel(false);
    let (a, a_task) = spawn_elector(
        Replica::new(&shared),
        "a".into(),
        TIMING,
        WriteGate::leased(),
        a_stop,
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (b, _) = spawn_elector(
        Replica::new(&shared),
        "b".into(),
        TIMING,
        WriteGate::leased(),
        b_stop,
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(*a.borrow() && !*b.borrow());
    let _ = a_stop_tx.send(true);
    a_task.await.unwrap();
    let released = Instant::now();
    let mut b = b.clone();
    tokio::time::timeout(Duration::from_secs(30), b.wait_for(|l| *l))
        .await
        .expect("b leads")
        .unwrap();
    assert!(
        released.elapsed() <= TIMING.retry + Duration::from_millis(100),
        "took {:?}",
        released.elapsed()
    );
}

fn idle_relay() -> RelayConfig {
    // A relay that keeps trying an address nobody listens on: its tasks exist until stopped.
    RelayConfig::new(
        "ns/b",
        Endpoint::new("mqtt://127.0.0.1:9", "src"),
        Endpoint::new("mqtt://127.0.0.1:9", "snk"),
        Vec::new(),
    )
}

#[tokio::test(start_paused = true)]
async fn relays_of_a_replica_that_lost_the_lease_stop_before_the_next_leader_starts() {
    let shared = Arc::new(MemoryLeaseStore::default());
    let (a_store, b_store) = (Replica::new(&shared), Replica::new(&shared));
    let (_stop_tx, stop) = watch::channel(false);
    let (a_leader, _) = spawn_elector(
        a_store.clone(),
        "a".into(),
        TIMING,
        WriteGate::leased(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (b_leader, _) = spawn_elector(
        b_store.clone(),
        "b".into(),
        TIMING,
        WriteGate::leased(),
        stop.clone(),
    );
    let relays_a = Arc::new(RelayManager::new(None));
    let relays_b = Arc::new(RelayManager::new(None));
    // Each replica's "controllers" start one relay and run until told to stop.
    let controllers = |relays: Arc<RelayManager>| {
        move |mut rx: watch::Receiver<bool>| {
            let relays = relays.clone();
            async move {
                relays.ensure("ns/b", 1, idle_relay()).await;
                let _ = rx.wait_for(|s| *s).await;
                relays.stop_all().await;
            }
        }
    };
    let (ma, mb) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
    let (ra, rb) = (
        Arc::new(Readiness::default()),
        Arc::new(Readiness::default()),
    );
    {
        let (relays, ma, ra, leader, stop) = (
            relays_a.clone(),
            ma.clone(),
            ra.clone(),
            a_leader.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            run_when_leading(leader, stop, controllers(relays.clone()), &relays, &ma, &ra).await
        });
    }
    {
        let (relays, mb, rb, leader, stop) = (
            relays_b.clone(),
            mb.clone(),
            rb.clone(),
            b_leader.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            run_when_leading(leader, stop, controllers(relays.clone()), &relays, &mb, &rb).await
        });
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        relays_a.keys().await,
        vec!["ns/b".to_string()],
        "the leader runs the relay"
    );
    assert!(
        relays_b.keys().await.is_empty() && relays_b.is_paused(),
        "the standby runs nothing"
    );
    assert!(
        ma.encode().contains("iot_operator_leader 1")
            && mb.encode().contains("iot_operator_leader 0")
    );

    // Partition a; watch for b's relay and check that a's is gone by then.
    a_store.cut.store(true, Ordering::SeqCst);
    let start = Instant::now();
    loop {
        if !relays_b.keys().await.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "b never started its relay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        relays_a.keys().await.is_empty(),
        "a still ran its relay when b started one"
    );
    assert!(relays_a.is_paused());
    assert!(
        ma.encode().contains("iot_operator_leader 0")
            && mb.encode().contains("iot_operator_leader 1")
    );
}
