//! Finds a message that a broker refuses by closing the connection. MQTT 3.1.1 has no other way
//! to refuse a publish, and AWS IoT Core closes the connection on a publish its policy denies:
//! without this, the relay sends the message again on every connection and everything behind it
//! waits forever. Pure bookkeeping; the publisher feeds it connection ends.
//!
//! A message is suspected when connections end quickly while it is the oldest one handed over
//! and not acknowledged. After [`STRIKES`] such ends it is sent alone; after [`STRIKES`] more
//! quick ends with it alone and nothing acknowledged, it is given up. Its acknowledgement, or a
//! connection that lives, clears the suspicion, so a broker that is merely restarting does not
//! cost a message.

/// Connection ends before a suspect is isolated, and again before it is dropped.
pub const STRIKES: u32 = 3;

/// What the publisher should do after a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send as usual.
    Continue,
    /// Send only the oldest message until it is acknowledged or dropped.
    Isolate,
    /// Drop the message with this sequence number (the oldest one).
    Drop(u64),
}

/// The suspicion of one side.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefusalWatch {
    suspect: Option<u64>,
    strikes: u32,
    isolated: bool,
}

impl RefusalWatch {
    /// Whether only the oldest message may be sent.
    pub fn isolated(&self) -> bool {
        self.isolated
    }

    /// What to do as things stand, without a new connection end: send the suspect alone while
    /// it is isolated, else as usual. Used for an end this side did not cause (another relay's
    /// publish on a shared connection), which neither strikes nor clears the suspect.
    pub fn current(&self) -> Verdict {
        if self.isolated {
            Verdict::Isolate
        } else {
            Verdict::Continue
        }
    }

    /// The suspect was acknowledged (or nothing is suspected any more).
    pub fn on_progress(&mut self) {
        *self = Self::default();
    }

    /// A connection ended. `oldest_written`: the oldest message handed to it and not
    /// acknowledged; `acknowledged`: whether anything was acknowledged on it (while isolated,
    /// that can only be the suspect); `quick`: whether it ended soon after it started (a refusal
    /// closes it at once).
    pub fn on_connection_end(
        &mut self,
        oldest_written: Option<u64>,
        acknowledged: bool,
        quick: bool,
    ) -> Verdict {
        let cleared = !quick || (self.isolated && acknowledged);
        let Some(seq) = oldest_written.filter(|_| !cleared) else {
            self.on_progress();
            return Verdict::Continue;
        };
        if self.suspect == Some(seq) {
            self.strikes += 1;
        } else {
            *self = Self {
                suspect: Some(seq),
                strikes: 1,
                isolated: false,
            };
        }
        if self.strikes < STRIKES {
            return self.current();
        }
        if self.isolated {
            self.on_progress();
            Verdict::Drop(seq)
        } else {
            self.isolated = true;
            self.strikes = 0;
            Verdict::Isolate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_refused_every_time_is_isolated_then_dropped() {
        let mut w = RefusalWatch::default();
        assert_eq!(w.on_connection_end(Some(7), false, true), Verdict::Continue);
        assert_eq!(w.on_connection_end(Some(7), false, true), Verdict::Continue);
        assert_eq!(w.on_connection_end(Some(7), false, true), Verdict::Isolate);
        assert!(w.isolated());
        assert_eq!(w.on_connection_end(Some(7), false, true), Verdict::Isolate);
        assert_eq!(w.on_connection_end(Some(7), false, true), Verdict::Isolate);
        assert_eq!(w.on_connection_end(Some(7), false, true), Verdict::Drop(7));
        assert!(!w.isolated());
    }

    #[test]
    fn an_acknowledgement_while_isolated_or_a_slow_end_clears_the_suspicion() {
        let mut w = RefusalWatch::default();
        // Earlier messages acknowledged on the connection do not clear the oldest one left.
        w.on_connection_end(Some(7), true, true);
        w.on_connection_end(Some(7), true, true);
        assert_eq!(w.on_connection_end(Some(7), true, true), Verdict::Isolate);
        // Alone, and acknowledged: not a refusal.
        assert_eq!(w.on_connection_end(Some(7), true, true), Verdict::Continue);
        assert!(!w.isolated());
        w.on_connection_end(Some(7), false, true);
        w.on_connection_end(Some(7), false, true);
        // A connection that lived long: not a refusal either.
        assert_eq!(
            w.on_connection_end(Some(7), false, false),
            Verdict::Continue
        );
        w.on_connection_end(Some(7), false, true);
        w.on_progress();
        assert_eq!(w, RefusalWatch::default());
        // Nothing written: nothing to suspect.
        assert_eq!(w.on_connection_end(None, false, true), Verdict::Continue);
    }

    #[test]
    fn a_new_oldest_message_starts_over() {
        let mut w = RefusalWatch::default();
        w.on_connection_end(Some(7), false, true);
        w.on_connection_end(Some(7), false, true);
        assert_eq!(w.on_connection_end(Some(8), false, true), Verdict::Continue);
        assert_eq!(w.on_connection_end(Some(8), false, true), Verdict::Continue);
        assert_eq!(w.on_connection_end(Some(8), false, true), Verdict::Isolate);
    }

    #[test]
    fn an_isolated_message_that_is_acknowledged_is_kept() {
        let mut w = RefusalWatch::default();
        for _ in 0..STRIKES {
            w.on_connection_end(Some(7), false, true);
        }
        assert!(w.isolated());
        w.on_progress();
        assert!(!w.isolated());
    }
}
