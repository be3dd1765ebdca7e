//! The outbox of one side: messages handed to this side for publishing, until the broker has
//! acknowledged them. Pure bookkeeping, no I/O.
//!
//! rumqttc reports `Outgoing::Publish(pkid)` when it writes a publish and
//! `Incoming::PubAck(pkid)` when the broker acknowledges it; publishes are written in the order
//! they were requested on one connection. The outbox maps the n-th request to the n-th outgoing
//! event. A new connection starts a fresh rumqttc event loop, so nothing from an old connection
//! can arrive out of turn; everything not acknowledged is sent again, in the original order.

use std::collections::VecDeque;

/// Sequence numbers by packet id: a table indexed by packet id (ids are small: the connection
/// hands them out from 1 up to the window), instead of a hashed map on the per-message path.
#[derive(Debug, Default)]
struct ByPkid(Vec<Option<u64>>);

impl ByPkid {
    fn contains(&self, pkid: u16) -> bool {
        self.0.get(usize::from(pkid)).is_some_and(Option::is_some)
    }

    fn insert(&mut self, pkid: u16, seq: u64) {
        let i = usize::from(pkid);
        if i >= self.0.len() {
            self.0.resize(i + 1, None);
        }
        self.0[i] = Some(seq);
    }

    fn remove(&mut self, pkid: u16) -> Option<u64> {
        self.0.get_mut(usize::from(pkid)).and_then(Option::take)
    }

    fn clear(&mut self) {
        self.0.fill(None);
    }
}

/// State of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Not yet handed to the connection.
    Waiting,
    /// Handed to the connection, not yet written.
    Requested,
    /// Written with this packet id, waiting for PUBACK.
    Sent(u16),
}

#[derive(Debug)]
struct Entry<T> {
    item: T,
    qos1: bool,
    slot: Slot,
}

/// Messages in flight on one side.
#[derive(Debug)]
pub struct Outbox<T> {
    entries: VecDeque<(u64, Entry<T>)>,
    next_seq: u64,
    /// Sequence numbers of entries in `Waiting` state, in order (so taking the next ones does
    /// not walk past the messages in flight).
    waiting: VecDeque<u64>,
    /// Sequence numbers of entries in `Requested` state, in request order.
    requested: VecDeque<u64>,
    by_pkid: ByPkid,
    /// Entries handed to the connection and not acknowledged.
    unacked: usize,
    window: usize,
    /// Messages handed to the connection at once: the window, or 1 while the oldest message is
    /// sent alone (suspected of being refused).
    send_limit: usize,
}

impl<T> Outbox<T> {
    /// `window`: how many messages may be handed to the connection at once.
    pub fn new(window: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            next_seq: 0,
            waiting: VecDeque::new(),
            requested: VecDeque::new(),
            by_pkid: ByPkid::default(),
            unacked: 0,
            window: window.max(1),
            send_limit: window.max(1),
        }
    }

    /// Sends only the oldest message (`true`) or the whole window again (`false`).
    pub fn isolate(&mut self, alone: bool) {
        self.send_limit = if alone { 1 } else { self.window };
    }

    /// Sequence number of the oldest message if it was handed to the connection (written, or
    /// about to be) and is not acknowledged.
    pub fn oldest_written(&self) -> Option<u64> {
        match self.entries.front() {
            Some((seq, e)) if e.slot != Slot::Waiting => Some(*seq),
            _ => None,
        }
    }

    /// Removes the oldest message if it has sequence number `seq` and is not in flight (after
    /// [`Outbox::on_disconnect`]).
    pub fn remove_oldest(&mut self, seq: u64) -> Option<T> {
        match self.entries.front() {
            Some((s, e)) if *s == seq && e.slot == Slot::Waiting => {}
            _ => return None,
        }
        self.waiting.retain(|s| *s != seq);
        self.entries.pop_front().map(|(_, e)| e.item)
    }

    /// Messages held (waiting or in flight).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether more messages should be accepted from the other side (bounded buffering).
    pub fn has_room(&self) -> bool {
        self.entries.len() < self.window * 2
    }

    /// Adds a message at the back.
    pub fn push(&mut self, item: T, qos1: bool) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back(seq);
        self.entries.push_back((
            seq,
            Entry {
                item,
                qos1,
                slot: Slot::Waiting,
            },
        ));
    }

    /// Marks waiting messages as requested, up to the window, and returns them in order for the
    /// caller to hand to the connection.
    #[cfg(test)]
    pub fn take_sendable(&mut self) -> Vec<&T> {
        let before = self.requested.len();
        self.for_each_sendable(|_| {});
        let new: Vec<u64> = self.requested.iter().skip(before).copied().collect();
        new.iter()
            .filter_map(|seq| self.index_of(*seq))
            .map(|i| &self.entries[i].1.item)
            .collect()
    }

    /// Marks waiting messages as requested, up to the window, and calls `f` with each, in order,
    /// for the caller to hand to the connection.
    ///
    /// With more messages waiting than the window has room for, nothing is sent until a quarter
    /// of the window is free: the messages wait for room either way, and refilling a slot at a
    /// time as acknowledgements trickle in kept the batches (and every system call on both ends)
    /// as small as the broker's reads.
    pub fn for_each_sendable(&mut self, mut f: impl FnMut(&T)) {
        let mut budget = self.send_limit.saturating_sub(self.unacked);
        if self.waiting.len() > budget && budget < (self.send_limit / 4).max(1) {
            return;
        }
        while budget > 0 {
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            let Some(idx) = self.index_of(seq) else {
                continue;
            };
            let e = &mut self.entries[idx].1;
            e.slot = Slot::Requested;
            self.requested.push_back(seq);
            self.unacked += 1;
            budget -= 1;
            f(&e.item);
        }
    }

    /// The connection wrote a publish. QoS 0 messages are done once written and are returned.
    pub fn on_outgoing(&mut self, pkid: u16) -> Option<T> {
        if pkid != 0 && self.by_pkid.contains(pkid) {
            // A retransmission inside rumqttc; already tracked.
            return None;
        }
        let seq = self.requested.pop_front()?;
        let idx = self.index_of(seq)?;
        if self.entries[idx].1.qos1 {
            self.entries[idx].1.slot = Slot::Sent(pkid);
            self.by_pkid.insert(pkid, seq);
            None
        } else {
            self.unacked -= 1;
            self.entries.remove(idx).map(|(_, e)| e.item)
        }
    }

    /// The broker acknowledged a publish: returns the message it acknowledged.
    pub fn on_puback(&mut self, pkid: u16) -> Option<T> {
        let seq = self.by_pkid.remove(pkid)?;
        let idx = self.index_of(seq)?;
        self.unacked -= 1;
        self.entries.remove(idx).map(|(_, e)| e.item)
    }

    /// The connection is gone: everything not acknowledged waits to be sent again.
    pub fn on_disconnect(&mut self) {
        self.waiting.clear();
        for (seq, e) in self.entries.iter_mut() {
            e.slot = Slot::Waiting;
            self.waiting.push_back(*seq);
        }
        self.requested.clear();
        self.by_pkid.clear();
        self.unacked = 0;
    }

    /// Removes every message (used when a relay stops without draining).
    pub fn drain_all(&mut self) -> Vec<T> {
        self.waiting.clear();
        self.requested.clear();
        self.by_pkid.clear();
        self.unacked = 0;
        self.entries.drain(..).map(|(_, e)| e.item).collect()
    }

    fn index_of(&self, seq: u64) -> Option<usize> {
        // Entries are sorted by sequence number, with gaps where messages finished out of
        // order; without gaps (the common case) the entry is `seq - first` along.
        let first = self.entries.front()?.0;
        let guess = usize::try_from(seq.checked_sub(first)?).ok()?;
        if self.entries.get(guess).is_some_and(|(s, _)| *s == seq) {
            return Some(guess);
        }
        self.entries.binary_search_by_key(&seq, |(s, _)| *s).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_message_can_be_sent_alone_and_removed() {
        let mut o = Outbox::new(10);
        for m in ["a", "b", "c"] {
            o.push(m, true);
        }
        assert_eq!(o.oldest_written(), None, "not handed to the connection");
        assert_eq!(o.take_sendable(), vec![&"a", &"b", &"c"]);
        assert_eq!(o.oldest_written(), Some(0), "handed over");
        o.on_outgoing(1);
        o.on_outgoing(2);
        assert_eq!(o.oldest_written(), Some(0));
        o.on_disconnect();
        o.isolate(true);
        assert_eq!(o.take_sendable(), vec![&"a"], "alone");
        o.on_disconnect();
        assert_eq!(o.remove_oldest(1), None, "only the oldest");
        assert_eq!(o.remove_oldest(0), Some("a"));
        o.isolate(false);
        assert_eq!(o.take_sendable(), vec![&"b", &"c"]);
    }

    #[test]
    fn qos1_completes_on_puback_in_any_order() {
        let mut o = Outbox::new(10);
        o.push("a", true);
        o.push("b", true);
        assert_eq!(o.take_sendable(), vec![&"a", &"b"]);
        assert_eq!(o.on_outgoing(1), None);
        assert_eq!(o.on_outgoing(2), None);
        assert_eq!(o.on_puback(2), Some("b"));
        assert_eq!(o.on_puback(1), Some("a"));
        assert!(o.is_empty());
        assert_eq!(o.on_puback(1), None);
    }

    #[test]
    fn qos0_completes_when_written() {
        let mut o = Outbox::new(10);
        o.push("a", false);
        o.push("b", true);
        o.take_sendable();
        assert_eq!(o.on_outgoing(0), Some("a"));
        assert_eq!(o.on_outgoing(7), None);
        assert_eq!(o.on_puback(7), Some("b"));
    }

    #[test]
    fn window_bounds_requests() {
        let mut o = Outbox::new(2);
        for i in 0..5 {
            o.push(i, true);
        }
        assert_eq!(o.take_sendable().len(), 2);
        assert!(o.take_sendable().is_empty());
        o.on_outgoing(1);
        o.on_puback(1);
        assert_eq!(o.take_sendable(), vec![&2]);
        assert!(!o.has_room() || o.len() < 4);
    }

    #[test]
    fn a_full_window_refills_a_quarter_at_a_time() {
        let mut o = Outbox::new(8);
        for i in 0..20 {
            o.push(i, true);
        }
        assert_eq!(o.take_sendable().len(), 8);
        for pkid in 1..=8 {
            o.on_outgoing(pkid);
        }
        assert_eq!(o.on_puback(1), Some(0));
        assert!(
            o.take_sendable().is_empty(),
            "one free slot of 8 with 12 waiting: wait for a quarter"
        );
        assert_eq!(o.on_puback(2), Some(1));
        assert_eq!(o.take_sendable(), vec![&8, &9], "a quarter free: refilled");
        // What is waiting and fits is sent at once, however little room there is.
        let mut o = Outbox::new(8);
        for i in 0..7 {
            o.push(i, true);
        }
        assert_eq!(o.take_sendable().len(), 7);
        o.push(7, true);
        assert_eq!(o.take_sendable(), vec![&7]);
        // Sent alone (a suspect), the quarter is one message.
        o.on_disconnect();
        o.isolate(true);
        assert_eq!(o.take_sendable(), vec![&0]);
    }

    #[test]
    fn disconnect_resends_unacked_in_order() {
        let mut o = Outbox::new(10);
        for i in 0..4 {
            o.push(i, true);
        }
        o.take_sendable();
        o.on_outgoing(1);
        o.on_outgoing(2);
        assert_eq!(o.on_puback(1), Some(0));
        // 1 was sent but not acked; 2 and 3 were requested but not written.
        o.on_disconnect();
        assert_eq!(o.take_sendable(), vec![&1, &2, &3]);
        // New connection, packet ids start again.
        o.on_outgoing(1);
        o.on_outgoing(2);
        o.on_outgoing(3);
        assert_eq!(o.on_puback(3), Some(3));
        assert_eq!(o.on_puback(1), Some(1));
        assert_eq!(o.on_puback(2), Some(2));
        assert!(o.is_empty());
    }

    #[test]
    fn retransmission_of_a_tracked_pkid_is_ignored() {
        let mut o = Outbox::new(10);
        o.push("a", true);
        o.push("b", true);
        o.take_sendable();
        o.on_outgoing(5);
        assert_eq!(o.on_outgoing(5), None);
        o.on_outgoing(6);
        assert_eq!(o.on_puback(6), Some("b"));
        assert_eq!(o.on_puback(5), Some("a"));
    }

    /// A model of one side driven by random operations, with rumqttc simulated: requests are
    /// written in order with increasing packet ids, the broker acknowledges in any order, and a
    /// disconnect loses what was requested or sent. Every message completes exactly once, the
    /// window holds, and resends keep the original order.
    #[test]
    fn random_operations_keep_every_message_exactly_once() {
        for seed in 0..300u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let window = rng.usize(1..6);
            let mut o: Outbox<u32> = Outbox::new(window);
            let (mut next, mut pkid) = (0u32, 0u16);
            let mut channel: VecDeque<u32> = VecDeque::new();
            let mut sent: Vec<(u16, u32)> = Vec::new();
            let mut done: Vec<u32> = Vec::new();
            let mut qos1 = std::collections::HashSet::new();
            for _ in 0..200 {
                match rng.u8(0..5) {
                    0 if o.has_room() => {
                        let q = rng.bool();
                        if q {
                            qos1.insert(next);
                        }
                        o.push(next, q);
                        next += 1;
                    }
                    1 => {
                        let mut batch = Vec::new();
                        o.for_each_sendable(|m| batch.push(*m));
                        // Resends come in the original order.
                        assert!(batch.windows(2).all(|w| w[0] < w[1]), "seed {seed}");
                        channel.extend(batch);
                    }
                    2 => {
                        if let Some(m) = channel.pop_front() {
                            let id = if qos1.contains(&m) {
                                pkid = pkid % 1000 + 1;
                                sent.push((pkid, m));
                                pkid
                            } else {
                                0
                            };
                            if let Some(d) = o.on_outgoing(id) {
                                assert_eq!(d, m, "seed {seed}");
                                done.push(d);
                            }
                        }
                    }
                    3 if !sent.is_empty() => {
                        let (id, m) = sent.swap_remove(rng.usize(..sent.len()));
                        assert_eq!(o.on_puback(id), Some(m), "seed {seed}");
                        done.push(m);
                    }
                    4 if rng.u8(0..4) == 0 => {
                        channel.clear();
                        sent.clear();
                        pkid = 0;
                        o.on_disconnect();
                    }
                    _ => {}
                }
                assert!(o.unacked <= window, "seed {seed}");
            }
            // A final reconnect delivers everything left: nothing is stuck.
            o.on_disconnect();
            for _ in 0..=next {
                let mut batch = Vec::new();
                o.for_each_sendable(|m| batch.push(*m));
                for (i, m) in batch.into_iter().enumerate() {
                    let id = if qos1.contains(&m) { i as u16 + 1 } else { 0 };
                    if let Some(d) = o.on_outgoing(id) {
                        done.push(d);
                    }
                    if id != 0 {
                        done.extend(o.on_puback(id));
                    }
                }
            }
            assert!(o.is_empty(), "seed {seed}: {} message(s) stuck", o.len());
            let mut seen = std::collections::HashSet::new();
            assert!(
                done.iter().all(|m| seen.insert(*m)),
                "seed {seed}: completed twice"
            );
            assert_eq!(
                done.len() + o.len(),
                next as usize,
                "seed {seed}: lost a message"
            );
        }
    }
}
