//! Property tests of the pure planner (proptest): random desired, observed, previously applied,
//! foreign and protected sets over a small universe of targets, so that overlaps are frequent.

use std::collections::BTreeSet;

use iot_operator::policy::PolicyVersion;
use iot_operator::policy::plan::{MAX_POLICY_VERSIONS, ObservedPolicy, plan};
use iot_operator::policy::{Observed, Plan, PlanInput};
use proptest::prelude::*;

const UNIVERSE: [&str; 8] = [
    "eu-west-1:id-a",
    "eu-west-1:id-b",
    "eu-west-1:id-c",
    "eu-west-1:id-d",
    "arn:aws:iot:eu-west-1:123456789012:cert/e",
    "arn:aws:iot:eu-west-1:123456789012:cert/f",
    "arn:aws:iot:eu-west-1:123456789012:thinggroup/g",
    "arn:aws:iot:eu-west-1:123456789012:thinggroup/h",
];

fn targets() -> impl Strategy<Value = BTreeSet<String>> {
    proptest::bits::u8::ANY.prop_map(|mask| {
        UNIVERSE
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, t)| t.to_string())
            .collect()
    })
}

#[derive(Debug, Clone)]
struct Case {
    desired: BTreeSet<String>,
    applied: BTreeSet<String>,
    foreign: BTreeSet<String>,
    protected: BTreeSet<String>,
    attached: BTreeSet<String>,
    deleting: bool,
    /// (managed document, observed policy: None = missing, Some(doc, versions))
    document: Option<(String, Option<(String, usize)>)>,
}

fn cases() -> impl Strategy<Value = Case> {
    let document = proptest::option::of((
        prop_oneof![Just("doc-1".to_string()), Just("doc-2".to_string())],
        proptest::option::of((
            prop_oneof![Just("doc-1".to_string()), Just("doc-2".to_string())],
            1usize..=MAX_POLICY_VERSIONS,
        )),
    ));
    (
        targets(),
        targets(),
        targets(),
        targets(),
        targets(),
        any::<bool>(),
        document,
    )
        .prop_map(
            |(desired, applied, foreign, protected, attached, deleting, document)| Case {
                desired,
                applied,
                foreign,
                protected,
                attached,
                deleting,
                document,
            },
        )
}

fn observed_of(case: &Case) -> Observed {
    let policy = case
        .document
        .as_ref()
        .and_then(|(_, observed)| observed.as_ref())
        .map(|(doc, n)| ObservedPolicy {
            arn: "arn:aws:iot:eu-west-1:123456789012:policy/p".into(),
            default_version_id: n.to_string(),
            canonical_document: Some(doc.clone()),
            versions: (1..=*n)
                .map(|v| PolicyVersion {
                    version_id: v.to_string(),
                    is_default: v == *n,
                    created: v as i64 * 10,
                })
                .collect(),
        });
    Observed {
        attached: case.attached.clone(),
        policy,
    }
}

fn input_of(case: &Case) -> PlanInput<'_> {
    PlanInput {
        desired: &case.desired,
        previously_applied: &case.applied,
        foreign: &case.foreign,
        protected: &case.protected,
        document: case.document.as_ref().map(|(d, _)| d.as_str()),
        deleting: case.deleting,
    }
}

/// What AWS holds after the plan ran without errors.
fn apply(plan: &Plan, observed: &Observed, document: Option<&str>) -> Observed {
    let mut after = observed.clone();
    for t in &plan.detach {
        after.attached.remove(t);
    }
    for t in &plan.attach {
        after.attached.insert(t.clone());
    }
    if plan.create_policy {
        after.policy = Some(ObservedPolicy {
            arn: "arn:aws:iot:eu-west-1:123456789012:policy/p".into(),
            default_version_id: "1".into(),
            canonical_document: document.map(str::to_owned),
            versions: vec![PolicyVersion {
                version_id: "1".into(),
                is_default: true,
                created: 1000,
            }],
        });
    }
    if plan.create_version
        && let Some(p) = after.policy.as_mut()
    {
        p.versions
            .retain(|v| !plan.prune_versions.contains(&v.version_id));
        for v in &mut p.versions {
            v.is_default = false;
        }
        p.versions.push(PolicyVersion {
            version_id: "99".into(),
            is_default: true,
            created: 1000,
        });
        p.default_version_id = "99".into();
        p.canonical_document = document.map(str::to_owned);
    }
    after
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Never detaches a pair that is foreign or that another binding wants, nor one this
    /// binding did not apply, nor one that is not attached.
    #[test]
    fn never_detaches_what_is_not_ours(case in cases()) {
        let observed = observed_of(&case);
        let p = plan(input_of(&case), &observed);
        for t in &p.detach {
            prop_assert!(!case.protected.contains(t), "detached protected {t}");
            prop_assert!(!case.foreign.contains(t), "detached foreign {t}");
            prop_assert!(case.applied.contains(t), "detached {t} it never applied");
            prop_assert!(observed.attached.contains(t), "detached {t}, which is not attached");
        }
        if case.deleting {
            prop_assert!(p.attach.is_empty(), "attached while deleting");
            prop_assert!(!p.create_policy && !p.create_version);
        }
    }

    /// After applying the plan: every desired target is attached, every target still attached
    /// but not desired is one the binding may not remove, and the managed document is in force.
    #[test]
    fn applying_the_plan_yields_the_desired_state(case in cases()) {
        let observed = observed_of(&case);
        let input = input_of(&case);
        let p = plan(input, &observed);
        let after = apply(&p, &observed, input.document);
        let keep = |t: &String| {
            case.foreign.contains(t) || case.protected.contains(t) || !case.applied.contains(t)
        };
        if case.deleting {
            for t in &after.attached {
                prop_assert!(keep(t), "{t} still attached after deletion");
            }
        } else {
            for t in &case.desired {
                prop_assert!(after.attached.contains(t), "{t} desired but not attached");
            }
            for t in after.attached.difference(&case.desired) {
                prop_assert!(keep(t), "{t} attached, not desired, and removable");
            }
            if let Some(doc) = input.document {
                let policy = after.policy.as_ref().expect("the policy exists");
                prop_assert_eq!(policy.canonical_document.as_deref(), Some(doc));
                prop_assert!(policy.versions.len() <= MAX_POLICY_VERSIONS);
                prop_assert_eq!(policy.versions.iter().filter(|v| v.is_default).count(), 1);
            }
        }
    }

    /// A second plan against the state the first one produced changes nothing.
    #[test]
    fn planning_again_changes_nothing(case in cases()) {
        let observed = observed_of(&case);
        let input = input_of(&case);
        let first = plan(input, &observed);
        let after = apply(&first, &observed, input.document);
        let second = plan(input, &after);
        prop_assert!(second.attach.is_empty(), "{:?}", second);
        prop_assert!(second.detach.is_empty(), "{:?}", second);
        prop_assert!(!second.create_policy && !second.create_version, "{:?}", second);
    }

    /// The default version is never pruned, and pruning makes room for exactly one more.
    #[test]
    fn pruning_keeps_the_default_and_makes_room(n in 1usize..=MAX_POLICY_VERSIONS, default in 0usize..MAX_POLICY_VERSIONS) {
        let default = default % n;
        let versions: Vec<PolicyVersion> = (0..n)
            .map(|v| PolicyVersion { version_id: (v + 1).to_string(), is_default: v == default, created: (v as i64) * 7 })
            .collect();
        let pruned = iot_operator::policy::plan::versions_to_prune(&versions);
        prop_assert!(!pruned.contains(&(default + 1).to_string()));
        prop_assert!(n - pruned.len() < MAX_POLICY_VERSIONS);
    }
}
