//! What a binding remembers between syncs, and the journal that makes it durable before AWS is
//! changed. The rule that keeps every attachment tracked: a target is recorded as the binding's
//! before the binding attaches it, and forgotten only after it is detached.

use std::collections::BTreeSet;
use std::future::Future;

/// What a binding answers for: the explicit targets and pools it applied (their pairs are
/// detached when they leave the spec) and the targets that had the policy before the binding
/// wanted them (never detached).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// Explicit targets (identity ids and ARNs) applied.
    pub targets: BTreeSet<String>,
    /// Cognito identity pools applied: every identity listed in them is the binding's.
    pub pools: BTreeSet<String>,
    /// Targets that had the policy before the binding wanted them.
    pub foreign: BTreeSet<String>,
}

impl Memory {
    /// Everything either remembers. Recording the union before a change is always safe: a
    /// target the binding may have attached is kept as applied, and a foreign one stays foreign.
    pub fn union(&self, other: &Memory) -> Memory {
        Memory {
            targets: self.targets.union(&other.targets).cloned().collect(),
            pools: self.pools.union(&other.pools).cloned().collect(),
            foreign: self.foreign.union(&other.foreign).cloned().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.applies_nothing() && self.foreign.is_empty()
    }

    /// Whether the binding applied no target and no pool, so it has nothing to detach.
    pub fn applies_nothing(&self) -> bool {
        self.targets.is_empty() && self.pools.is_empty()
    }
}

/// Why a record could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// Only the leader writes records (and, after them, AWS).
    #[error("could not record what the binding answers for: this replica no longer leads")]
    NotLeading,
    /// Writing the record to `place` (a ConfigMap, a state file) failed.
    #[error("could not record what the binding answers for: {place}: {}", crate::error::chain(.source))]
    Write {
        place: String,
        #[source]
        source: crate::error::Source,
    },
}

/// Durable storage of a binding's [`Memory`], written by the engine around its AWS writes.
pub trait Journal: Sync {
    /// Stores `memory` durably; the engine changes AWS only after this returned `Ok`.
    fn record(&self, memory: &Memory) -> impl Future<Output = Result<(), JournalError>> + Send;

    /// Whether the engine should stop before its next AWS write (a signal arrived).
    fn interrupted(&self) -> bool {
        false
    }

    /// How far the sync has got (after each page of identities and each attach); cheap and
    /// frequent, so an implementation that writes somewhere paces itself.
    fn progress(&self, _progress: &SyncProgress) {}
}

/// How far a sync has got, for people watching a large pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncProgress {
    /// Identities listed so far from the pools, then (once planned) every desired target.
    pub seen: usize,
    /// Desired targets that have the policy (known once planned).
    pub attached: usize,
    /// Desired targets this sync has yet to attach.
    pub remaining: usize,
}

/// Keeps nothing: the caller stores the report's memory itself (tests, dry runs, one-off syncs
/// without `--state`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoJournal;

impl Journal for NoJournal {
    async fn record(&self, _memory: &Memory) -> Result<(), JournalError> {
        Ok(())
    }
}

impl<J: Journal> Journal for &J {
    fn record(&self, memory: &Memory) -> impl Future<Output = Result<(), JournalError>> + Send {
        (**self).record(memory)
    }

    fn progress(&self, progress: &SyncProgress) {
        (**self).progress(progress)
    }

    fn interrupted(&self) -> bool {
        (**self).interrupted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn union_keeps_everything_either_side_remembers() {
        let a = Memory {
            targets: set(&["t1"]),
            pools: set(&["p1"]),
            foreign: set(&["f1"]),
        };
        let b = Memory {
            targets: set(&["t2"]),
            pools: set(&["p1", "p2"]),
            foreign: set(&[]),
        };
        let u = a.union(&b);
        assert_eq!(u.targets, set(&["t1", "t2"]));
        assert_eq!(u.pools, set(&["p1", "p2"]));
        assert_eq!(u.foreign, set(&["f1"]));
        assert!(!u.is_empty() && Memory::default().is_empty());
    }

    #[test]
    fn a_failed_write_keeps_its_cause_as_the_source_and_says_it_once() {
        let e = JournalError::Write {
            place: "ConfigMap ns/c".into(),
            source: crate::error::Source::new(std::io::Error::other("disk full")),
        };
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("disk full"));
        assert_eq!(
            crate::error::chain(&e),
            "could not record what the binding answers for: ConfigMap ns/c: disk full"
        );
    }
}
