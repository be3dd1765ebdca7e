//! Leader election hand-over between two replicas sharing one lease, through an in-memory lease
//! store (a fake: no API server runs here), on tokio's paused clock so timings are exact. The
//! same rules on the real control plane, with real brokers: tests/control_plane.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iot_operator::cli::run::run_when_leading;
use iot_operator::controller::leader::{
    Leadership, LeaseFuture, LeaseRecord, LeaseStore, MemoryLeaseStore, Timing, WriteGate,
    spawn_elector,
};
use iot_operator::relay::{Endpoint, RelayConfig, RelayManager};
use iot_operator::telemetry::Metrics;
use iot_operator::telemetry::http::Readiness;
use tokio::sync::watch;
use tokio::time::Instant;

/// One replica's view of the shared store; `cut` partitions it from the API server (calls
/// fail), `hang` makes every call wait forever (an API server that stopped answering).
struct Replica {
    shared: Arc<MemoryLeaseStore>,
    cut: AtomicBool,
    hang: AtomicBool,
    /// Reads that reached the store.
    reads: std::sync::atomic::AtomicUsize,
}

impl Replica {
    fn new(shared: &Arc<MemoryLeaseStore>) -> Arc<Self> {
        Arc::new(Self {
            shared: shared.clone(),
            cut: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            reads: Default::default(),
        })
    }
    fn fail<T: Send + 'static>(&self) -> Option<LeaseFuture<'_, T>> {
        if self.hang.load(Ordering::SeqCst) {
            return Some(Box::pin(std::future::pending()));
        }
        self.cut.load(Ordering::SeqCst).then(|| {
            Box::pin(async {
                Err(iot_operator::controller::leader::LeaseError::Store(
                    iot_operator::error::Source::message("partitioned"),
                ))
            }) as LeaseFuture<'_, T>
        })
    }
}

impl LeaseStore for Replica {
    fn get(&self) -> LeaseFuture<'_, Option<LeaseRecord>> {
        self.fail().unwrap_or_else(|| {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.shared.get()
        })
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
    deadline: Duration::from_secs(5),
};

type Log = Arc<std::sync::Mutex<Vec<(Instant, Leadership)>>>;

/// Records (time, leadership) on every change.
fn record_all(mut rx: watch::Receiver<Leadership>) -> Log {
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

/// Records (time, holds a valid lease) on every change.
fn record(mut rx: watch::Receiver<Leadership>) -> Arc<std::sync::Mutex<Vec<(Instant, bool)>>> {
    let log = Arc::new(std::sync::Mutex::new(vec![(
        Instant::now(),
        rx.borrow().is_leading(),
    )]));
    let l = log.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let v = rx.borrow_and_update().is_leading();
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
async fn exactly_one_valid_lease_a_partitioned_leader_lapses_before_takeover_and_then_follows() {
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
    assert!(
        a.borrow().is_leading() && !b.borrow().is_leading(),
        "a leads"
    );
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
    // Cut off, a cannot know that b took over: it is lapsed, not deposed.
    assert!(
        matches!(*a.borrow(), Leadership::Lapsed { .. }),
        "{:?}",
        *a.borrow()
    );
    a_store.cut.store(false, Ordering::SeqCst);
    tokio::time::sleep(TIMING.retry + Duration::from_millis(100)).await;
    assert_eq!(*a.borrow(), Leadership::Following, "a sees b's lease");
}

/// An API server that accepts requests and never answers: the elector's attempt has a deadline,
/// and the lease lapses exactly when its validity ends, not when the request returns.
#[tokio::test(start_paused = true)]
async fn a_hung_lease_request_does_not_hold_the_elector() {
    let shared = Arc::new(MemoryLeaseStore::default());
    let a_store = Replica::new(&shared);
    let (_stop_tx, stop) = watch::channel(false);
    let gate = WriteGate::leased();
    let (a, _) = spawn_elector(a_store.clone(), "a".into(), TIMING, gate.clone(), stop);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(a.borrow().is_leading() && gate.is_open());
    let log = record_all(a.clone());
    a_store.hang.store(true, Ordering::SeqCst);
    let hung_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let log = log.lock().unwrap().clone();
    let (lapsed_at, since) = log
        .iter()
        .find_map(|(t, l)| match l {
            Leadership::Lapsed { since, .. } => Some((*t, *since)),
            _ => None,
        })
        .expect("the lease lapsed");
    // The last renewal started at most `retry` before the hang; validity is duration - margin.
    let validity = TIMING.duration - TIMING.margin;
    assert!(
        lapsed_at - hung_at <= validity && lapsed_at == since,
        "lapsed {:?} after the hang (validity {validity:?}), announced at the end of validity: {}",
        lapsed_at - hung_at,
        lapsed_at == since
    );
    assert!(!gate.is_open());
    // The elector kept trying (each attempt timed out) and answers once the server does.
    a_store.hang.store(false, Ordering::SeqCst);
    tokio::time::sleep(TIMING.deadline + TIMING.retry + Duration::from_millis(100)).await;
    assert!(
        a.borrow().is_leading() && gate.is_open(),
        "{:?}",
        *a.borrow()
    );
    assert_eq!(a.borrow().term(), Some(1), "the same term");
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
    assert!(a.borrow().is_leading() && !b.borrow().is_leading());
    let _ = a_stop_tx.send(true);
    a_task.await.unwrap();
    let released = Instant::now();
    let mut b = b.clone();
    tokio::time::timeout(Duration::from_secs(30), b.wait_for(Leadership::is_leading))
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

/// One replica's controllers: start one relay, count starts, run until told to stop.
fn controllers(
    relays: Arc<RelayManager>,
    starts: Arc<std::sync::atomic::AtomicUsize>,
) -> impl Fn(watch::Receiver<bool>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
{
    move |mut rx: watch::Receiver<bool>| {
        let (relays, starts) = (relays.clone(), starts.clone());
        Box::pin(async move {
            starts.fetch_add(1, Ordering::SeqCst);
            relays
                .ensure(
                    &iot_operator::relay::ConnectionKey::new("ns/b", 0),
                    1,
                    idle_relay(),
                )
                .await;
            let _ = rx.wait_for(|s| *s).await;
            relays.stop_all().await;
        })
    }
}

struct Running {
    relays: Arc<RelayManager>,
    metrics: Arc<Metrics>,
    starts: Arc<std::sync::atomic::AtomicUsize>,
    gate: WriteGate,
}

/// A replica: elector plus `run_when_leading` with [`controllers`].
fn replica(store: Arc<Replica>, name: &str, stop: watch::Receiver<bool>) -> Running {
    let gate = WriteGate::leased();
    let (leader, _) = spawn_elector(store, name.into(), TIMING, gate.clone(), stop.clone());
    let r = Running {
        relays: Arc::new(RelayManager::new(None)),
        metrics: Arc::new(Metrics::new()),
        starts: Arc::default(),
        gate,
    };
    let (relays, metrics, starts) = (r.relays.clone(), r.metrics.clone(), r.starts.clone());
    tokio::spawn(async move {
        let readiness = Readiness::default();
        run_when_leading(
            leader,
            stop,
            controllers(relays.clone(), starts),
            &relays,
            &metrics,
            &readiness,
        )
        .await
    });
    r
}

/// Replicas `a` and `b` on one store, `a` leading after 20 s; the sender keeps them running.
async fn two_replicas() -> (
    Arc<MemoryLeaseStore>,
    Arc<Replica>,
    Arc<Replica>,
    Running,
    Running,
    watch::Sender<bool>,
) {
    let shared = Arc::new(MemoryLeaseStore::default());
    let (a_store, b_store) = (Replica::new(&shared), Replica::new(&shared));
    let (stop_tx, stop) = watch::channel(false);
    let a = replica(a_store.clone(), "a", stop.clone());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let b = replica(b_store.clone(), "b", stop);
    tokio::time::sleep(Duration::from_secs(20)).await;
    (shared, a_store, b_store, a, b, stop_tx)
}

/// The rule for a replica cut off from the API server: its relays keep running (static
/// stability) while its gate, which every new connection asks, shuts before another replica can
/// lead; it stops them once it sees the other holder.
#[tokio::test(start_paused = true)]
async fn a_partitioned_leader_keeps_its_relays_with_its_gate_shut_until_it_sees_the_new_leader() {
    let (_shared, a_store, _b_store, a, b, _stop_tx) = two_replicas().await;
    assert_eq!(
        a.relays.keys().await,
        vec![iot_operator::relay::ConnectionKey::new("ns/b", 0)],
        "the leader runs the relay"
    );
    assert!(
        b.relays.keys().await.is_empty() && b.relays.is_paused(),
        "the standby runs nothing"
    );
    assert!(
        a.metrics.encode().contains("iot_operator_leader 1")
            && b.metrics.encode().contains("iot_operator_leader 0")
    );

    // Partition a; watch for b's relay.
    a_store.cut.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let mut gate_shut_at = None;
    loop {
        if gate_shut_at.is_none() && !a.gate.is_open() {
            gate_shut_at = Some(start.elapsed());
        }
        if !b.relays.keys().await.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "b never started its relay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b_at = start.elapsed();
    let shut = gate_shut_at.expect("a's gate shut before b started");
    assert!(
        shut < b_at,
        "a's gate shut at {shut:?}, b started at {b_at:?}"
    );
    assert_eq!(
        a.relays.keys().await,
        vec![iot_operator::relay::ConnectionKey::new("ns/b", 0)],
        "a's relay keeps running while a cannot see b"
    );
    assert!(a.metrics.encode().contains("iot_operator_lease_lapsed 1"));
    // Healed: a reads the lease, sees b, and stops its relay.
    a_store.cut.store(false, Ordering::SeqCst);
    tokio::time::sleep(TIMING.retry + Duration::from_millis(200)).await;
    assert!(a.relays.keys().await.is_empty() && a.relays.is_paused());
    assert!(!a.gate.is_open());
    assert!(
        a.metrics.encode().contains("iot_operator_leader 0")
            && b.metrics.encode().contains("iot_operator_leader 1")
    );
}

/// An outage of a minute with no other replica: the same term carries on, and nothing that ran
/// was restarted: the controllers started once, the relay ran throughout.
#[tokio::test(start_paused = true)]
async fn a_lapse_without_another_holder_restarts_nothing() {
    let shared = Arc::new(MemoryLeaseStore::default());
    let a_store = Replica::new(&shared);
    let (_stop_tx, stop) = watch::channel(false);
    let a = replica(a_store.clone(), "a", stop);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        a.relays.keys().await,
        vec![iot_operator::relay::ConnectionKey::new("ns/b", 0)]
    );
    a_store.hang.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        assert_eq!(
            a.relays.keys().await,
            vec![iot_operator::relay::ConnectionKey::new("ns/b", 0)],
            "{:?} into the outage",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!a.gate.is_open());
    a_store.hang.store(false, Ordering::SeqCst);
    tokio::time::sleep(TIMING.deadline + TIMING.retry + Duration::from_millis(200)).await;
    assert!(a.gate.is_open());
    assert_eq!(
        a.relays.keys().await,
        vec![iot_operator::relay::ConnectionKey::new("ns/b", 0)]
    );
    assert_eq!(
        a.starts.load(Ordering::SeqCst),
        1,
        "the controllers started once"
    );
    assert!(a.metrics.encode().contains("iot_operator_lease_lapsed 0"));
}

/// The API server is down for a minute for both replicas. When it answers again the standby
/// happens to look first: it must not take over a lease it could not watch during the outage
/// (its observation restarts), so the holder renews and carries on in the same term.
#[tokio::test(start_paused = true)]
async fn after_an_outage_for_all_the_holder_keeps_its_lease() {
    let (shared, a_store, b_store, a, b, _stop_tx) = two_replicas().await;
    assert_eq!(shared.holder().as_deref(), Some("a"));
    let transitions = shared.record().expect("lease").transitions;
    // a's requests hang first, so that b has seen a's last renewal before its own hang too.
    a_store.hang.store(true, Ordering::SeqCst);
    tokio::time::sleep(TIMING.retry + Duration::from_secs(1)).await;
    b_store.hang.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    // b reads the unchanged record first, then a's requests get through again.
    let reads = b_store.reads.load(Ordering::SeqCst);
    b_store.hang.store(false, Ordering::SeqCst);
    while b_store.reads.load(Ordering::SeqCst) == reads {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a_store.hang.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(shared.holder().as_deref(), Some("a"));
    assert_eq!(shared.record().expect("lease").transitions, transitions);
    assert!(a.gate.is_open() && !b.gate.is_open());
    assert_eq!(a.starts.load(Ordering::SeqCst), 1, "nothing restarted on a");
    assert!(b.relays.keys().await.is_empty());
}
