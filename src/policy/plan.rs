//! The planner: desired state + observed state -> the actions that close the gap. Pure.

use std::collections::BTreeSet;

use super::iot_api::PolicyVersion;

/// AWS IoT keeps at most this many versions of a policy.
pub const MAX_POLICY_VERSIONS: usize = 5;

/// What AWS holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Targets the policy is attached to.
    pub attached: BTreeSet<String>,
    /// The policy, if it exists.
    pub policy: Option<ObservedPolicy>,
}

/// The policy as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPolicy {
    pub arn: String,
    pub default_version_id: String,
    /// Canonical JSON of the default version's document (`None` if AWS returned no JSON).
    pub canonical_document: Option<String>,
    /// Every version; only read when the document must change.
    pub versions: Vec<PolicyVersion>,
}

/// What the binding wants, and what it remembers of earlier syncs.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Targets wanted now (explicit targets and the identities of the pools).
    pub desired: &'a BTreeSet<String>,
    /// Targets this binding applied before (and so may detach).
    pub previously_applied: &'a BTreeSet<String>,
    /// Targets that had the policy before this binding wanted them: never detached.
    pub foreign: &'a BTreeSet<String>,
    /// Targets other bindings want for the same policy: never detached.
    pub protected: &'a BTreeSet<String>,
    /// Canonical JSON of the document the binding manages, if it manages one.
    pub document: Option<&'a str>,
    /// The binding is being deleted: detach what it applied, attach nothing.
    pub deleting: bool,
}

/// The actions to take, in order: policy, attach, detach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Create the policy with the managed document.
    pub create_policy: bool,
    /// Versions to delete before creating the new one, oldest first.
    pub prune_versions: Vec<String>,
    /// Create a new default version with the managed document.
    pub create_version: bool,
    /// Targets to attach.
    pub attach: Vec<String>,
    /// Of `attach`: targets this binding had attached before that lost the policy out of band.
    pub drift: Vec<String>,
    /// Targets to detach.
    pub detach: Vec<String>,
    /// Foreign targets after this plan: desired targets that have the policy and either were
    /// foreign or were never applied by this or another binding. A foreign target that lost the
    /// policy and is attached again by this plan is the binding's from then on.
    pub foreign: BTreeSet<String>,
}

impl Plan {
    /// Whether the plan changes anything in AWS.
    pub fn is_empty(&self) -> bool {
        !self.create_policy
            && !self.create_version
            && self.prune_versions.is_empty()
            && self.attach.is_empty()
            && self.detach.is_empty()
    }

    /// Number of write calls the plan makes.
    pub fn writes(&self) -> usize {
        self.create_policy as usize
            + self.create_version as usize
            + self.prune_versions.len()
            + self.attach.len()
            + self.detach.len()
    }
}

/// Which versions to delete so that one more fits under the limit: the oldest non-default ones.
pub fn versions_to_prune(versions: &[PolicyVersion]) -> Vec<String> {
    let excess = (versions.len() + 1).saturating_sub(MAX_POLICY_VERSIONS);
    let mut candidates: Vec<&PolicyVersion> = versions.iter().filter(|v| !v.is_default).collect();
    // Oldest first; version ids are increasing integers in AWS IoT, use them to break ties.
    candidates.sort_by_key(|v| (v.created, v.version_id.parse::<u64>().unwrap_or(u64::MAX)));
    candidates
        .into_iter()
        .take(excess)
        .map(|v| v.version_id.clone())
        .collect()
}

/// Computes the plan. Never detaches a foreign or protected target, never attaches while
/// deleting, and touches the policy document only when the binding manages one.
pub fn plan(input: PlanInput<'_>, observed: &Observed) -> Plan {
    let mut plan = Plan::default();

    if !input.deleting
        && let Some(doc) = input.document
    {
        match &observed.policy {
            None => plan.create_policy = true,
            Some(p) if p.canonical_document.as_deref() != Some(doc) => {
                plan.create_version = true;
                plan.prune_versions = versions_to_prune(&p.versions);
            }
            Some(_) => {}
        }
    }

    let keep = |t: &String| input.foreign.contains(t) || input.protected.contains(t);

    if input.deleting {
        plan.detach = observed
            .attached
            .iter()
            .filter(|t| input.previously_applied.contains(*t) && !keep(t))
            .cloned()
            .collect();
        plan.foreign = input.foreign.clone();
        return plan;
    }

    for t in input.desired {
        if observed.attached.contains(t) {
            continue;
        }
        if input.previously_applied.contains(t) && !input.foreign.contains(t) {
            plan.drift.push(t.clone());
        }
        plan.attach.push(t.clone());
    }
    plan.detach = observed
        .attached
        .iter()
        .filter(|t| {
            input.previously_applied.contains(*t) && !input.desired.contains(*t) && !keep(t)
        })
        .cloned()
        .collect();
    plan.foreign = input
        .desired
        .iter()
        .filter(|t| {
            // A target this plan attaches becomes the binding's, even if it was foreign once.
            observed.attached.contains(*t)
                && (input.foreign.contains(*t)
                    || (!input.previously_applied.contains(*t) && !input.protected.contains(*t)))
        })
        .cloned()
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn input<'a>(
        desired: &'a BTreeSet<String>,
        applied: &'a BTreeSet<String>,
        foreign: &'a BTreeSet<String>,
        protected: &'a BTreeSet<String>,
    ) -> PlanInput<'a> {
        PlanInput {
            desired,
            previously_applied: applied,
            foreign,
            protected,
            document: None,
            deleting: false,
        }
    }

    fn observed(attached: &[&str]) -> Observed {
        Observed {
            attached: set(attached),
            policy: None,
        }
    }

    #[test]
    fn attaches_missing_and_detaches_removed() {
        let (d, a, f, p) = (set(&["a", "b"]), set(&["b", "c"]), set(&[]), set(&[]));
        let plan = plan(input(&d, &a, &f, &p), &observed(&["b", "c"]));
        assert_eq!(plan.attach, vec!["a"]);
        assert_eq!(plan.detach, vec!["c"]);
        assert!(plan.drift.is_empty());
    }

    #[test]
    fn steady_state_plans_nothing() {
        let (d, a, f, p) = (set(&["a", "b"]), set(&["a", "b"]), set(&[]), set(&[]));
        let plan = plan(
            input(&d, &a, &f, &p),
            &observed(&["a", "b", "someone-else"]),
        );
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn never_detaches_what_others_attached() {
        // "x" was attached by someone else and was never applied by this binding.
        let (d, a, f, p) = (set(&[]), set(&["a"]), set(&[]), set(&[]));
        let plan = plan(input(&d, &a, &f, &p), &observed(&["a", "x"]));
        assert_eq!(plan.detach, vec!["a"]);
    }

    #[test]
    fn already_attached_target_becomes_foreign_and_stays() {
        let (d, a, f, p) = (set(&["x"]), set(&[]), set(&[]), set(&[]));
        let first = plan(input(&d, &a, &f, &p), &observed(&["x"]));
        assert_eq!(first.foreign, set(&["x"]));
        // Later the binding drops x: it must stay attached.
        let (d2, a2) = (set(&[]), set(&["x"]));
        let second = plan(input(&d2, &a2, &first.foreign, &p), &observed(&["x"]));
        assert!(second.detach.is_empty());
    }

    #[test]
    fn protected_pairs_survive_removal_and_deletion() {
        let (d, a, f, p) = (set(&[]), set(&["a", "b"]), set(&[]), set(&["b"]));
        let plan1 = plan(input(&d, &a, &f, &p), &observed(&["a", "b"]));
        assert_eq!(plan1.detach, vec!["a"]);
        let mut i = input(&d, &a, &f, &p);
        i.deleting = true;
        let plan2 = plan(i, &observed(&["a", "b"]));
        assert_eq!(plan2.detach, vec!["a"]);
        assert!(plan2.attach.is_empty());
    }

    #[test]
    fn a_foreign_target_this_binding_attaches_again_becomes_its_own() {
        // "x" was foreign, then lost the policy out of band: attaching it makes it ours.
        let (d, a, f, p) = (set(&["x"]), set(&["x"]), set(&["x"]), set(&[]));
        let plan = plan(input(&d, &a, &f, &p), &observed(&[]));
        assert_eq!(plan.attach, vec!["x"]);
        assert!(plan.foreign.is_empty(), "{plan:?}");
        // A foreign target that still has the policy stays foreign.
        let kept = super::plan(input(&d, &a, &f, &p), &observed(&["x"]));
        assert_eq!(kept.foreign, set(&["x"]));
    }

    #[test]
    fn drift_is_reported() {
        let (d, a, f, p) = (set(&["a", "b"]), set(&["a", "b"]), set(&[]), set(&[]));
        let plan = plan(input(&d, &a, &f, &p), &observed(&["a"]));
        assert_eq!(plan.attach, vec!["b"]);
        assert_eq!(plan.drift, vec!["b"]);
    }

    #[test]
    fn target_wanted_by_another_binding_is_not_foreign() {
        let (d, a, f, p) = (set(&["x"]), set(&[]), set(&[]), set(&["x"]));
        let plan = plan(input(&d, &a, &f, &p), &observed(&["x"]));
        assert!(plan.foreign.is_empty());
    }

    fn version(id: &str, default: bool, created: i64) -> PolicyVersion {
        PolicyVersion {
            version_id: id.into(),
            is_default: default,
            created,
        }
    }

    #[test]
    fn document_change_prunes_oldest_non_default() {
        let versions = vec![
            version("1", false, 10),
            version("2", false, 20),
            version("3", true, 30),
            version("4", false, 40),
            version("5", false, 50),
        ];
        assert_eq!(versions_to_prune(&versions), vec!["1"]);
        assert!(versions_to_prune(&versions[..3]).is_empty());
        let observed = Observed {
            attached: BTreeSet::new(),
            policy: Some(ObservedPolicy {
                arn: "arn".into(),
                default_version_id: "3".into(),
                canonical_document: Some("{\"old\":1}".into()),
                versions,
            }),
        };
        let (d, a, f, p) = (set(&[]), set(&[]), set(&[]), set(&[]));
        let mut i = input(&d, &a, &f, &p);
        i.document = Some("{\"new\":1}");
        let plan = plan(i, &observed);
        assert!(plan.create_version && !plan.create_policy);
        assert_eq!(plan.prune_versions, vec!["1"]);
        i.document = Some("{\"old\":1}");
        assert!(super::plan(i, &observed).is_empty());
    }

    #[test]
    fn missing_managed_policy_is_created() {
        let (d, a, f, p) = (set(&["a"]), set(&[]), set(&[]), set(&[]));
        let mut i = input(&d, &a, &f, &p);
        i.document = Some("{}");
        let plan = plan(i, &observed(&[]));
        assert!(plan.create_policy);
        assert_eq!(plan.attach, vec!["a"]);
    }
}
