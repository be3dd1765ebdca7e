//! Pure planning for bridges spread over replicas: who should run each bridge, which members are
//! alive, and what this replica does about the bridge leases it sees. No I/O, no clock of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// A stable 64-bit hash (FNV-1a with a final mix), the same in every replica and release:
/// assignments must agree between processes, so no per-process seeded hasher.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in part.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    // splitmix64's finaliser: FNV alone spreads short, similar strings poorly.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Which member runs each bridge: rendezvous (highest random weight) hashing with bounded
/// load. Each bridge goes to the member that ranks it highest among those that run fewer than
/// `ceil(bridges / members)`, so no member runs more than its share, and a member that joins or
/// leaves moves few bridges. Every replica computes the same answer from the same sets,
/// whatever their order.
pub fn assign(bridges: &BTreeSet<String>, members: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if members.is_empty() {
        return out;
    }
    let cap = bridges.len().div_ceil(members.len());
    let mut load: HashMap<&str, usize> = HashMap::new();
    // A fixed order that does not favour names sorting early.
    let mut order: Vec<&String> = bridges.iter().collect();
    order.sort_by_key(|b| (stable_hash(&[b.as_str()]), b.as_str()));
    for bridge in order {
        let mut ranked: Vec<&String> = members.iter().collect();
        ranked.sort_by_key(|m| {
            (
                std::cmp::Reverse(stable_hash(&[m.as_str(), bridge.as_str()])),
                m.as_str(),
            )
        });
        let chosen = ranked
            .into_iter()
            .find(|m| load.get(m.as_str()).copied().unwrap_or(0) < cap);
        if let Some(m) = chosen {
            *load.entry(m.as_str()).or_default() += 1;
            out.insert(bridge.clone(), m.clone());
        }
    }
    out
}

/// Which member leases are alive, judged by this replica's monotonic clock: a member is alive
/// while its lease keeps changing, and for `duration` after the last change this replica saw
/// (or after first seeing it). A released lease (no holder) is not alive.
///
/// Two answers: `alive` is the safe one, which alone allows taking a bridge over from its
/// holder; `likely` also trusts the age the lease's own `renewTime` gives on first sight (wall
/// clocks, so skew can fool it) and only shapes the assignment, so that a replica that has just
/// started does not count long-dead members for a whole lease duration.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: HashMap<String, Sighting>,
}

#[derive(Debug)]
struct Sighting {
    version: String,
    since: Instant,
    /// How old the lease said it was when this version was first seen.
    age: Duration,
}

/// What [`Liveness::observe`] concluded about one member lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Seen unchanged for less than a lease duration (by this replica's clock).
    pub alive: bool,
    /// Also younger than a lease duration by the age its `renewTime` gave on first sight.
    pub likely: bool,
    /// How long this replica has seen it unchanged.
    pub unchanged: Duration,
}

impl Liveness {
    /// Records the member lease `name` as seen at `now` with `version` and `holder`; `age` is
    /// how long ago its `renewTime` says it was written, if known.
    pub fn observe(
        &mut self,
        name: &str,
        version: &str,
        holder: &str,
        now: Instant,
        duration: Duration,
        age: Option<Duration>,
    ) -> Seen {
        let entry = self
            .seen
            .entry(name.to_owned())
            .or_insert_with(|| Sighting {
                version: version.to_owned(),
                since: now,
                age: age.unwrap_or_default(),
            });
        if entry.version != version {
            *entry = Sighting {
                version: version.to_owned(),
                since: now,
                age: Duration::ZERO,
            };
        }
        let unchanged = now.saturating_duration_since(entry.since);
        let held = !holder.is_empty();
        Seen {
            alive: held && unchanged < duration,
            likely: held && unchanged + entry.age < duration,
            unchanged,
        }
    }

    /// Forgets leases that are gone.
    pub fn retain(&mut self, names: &BTreeSet<String>) {
        self.seen.retain(|n, _| names.contains(n));
    }
}

/// A bridge lease as seen in one list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeLease {
    /// The Lease object's name.
    pub name: String,
    /// `namespace/name` of the bridge it is for.
    pub bridge: String,
    /// Who holds it; empty when released.
    pub holder: String,
    /// Whether the holder's member lease is alive by this replica's own watching
    /// ([`Seen::alive`]); only a lease whose holder is not may be taken over.
    pub holder_alive: bool,
}

/// What this replica sees, for one planning round.
#[derive(Debug, Default)]
pub struct View<'a> {
    /// This replica's identity.
    pub me: &'a str,
    /// Whether this replica's own membership is valid (its member lease renewed in time).
    pub member: bool,
    /// Members that are likely alive (including this replica when `member`): the assignment is
    /// computed over them.
    pub members: BTreeSet<String>,
    /// TopicBridges that exist, by `namespace/name`; `None` until the watch has synced (then
    /// nothing is acquired or collected: another replica may see bridges this one does not yet).
    pub bridges: Option<BTreeSet<String>>,
    /// Bridge leases, by bridge key.
    pub leases: BTreeMap<String, BridgeLease>,
    /// Bridges whose lease this replica holds and whose relay it may run.
    pub held: BTreeSet<String>,
}

/// What to do about one bridge lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Take the lease (create it, or write it over a released lease, a dead holder's, or this
    /// replica's own from before a lapse) and then run the bridge.
    Acquire { bridge: String },
    /// Another member should run the bridge: stop (drain) its relay, then release the lease.
    Release { bridge: String },
    /// The lease names someone else although this replica thought it held it: stop at once.
    Lost { bridge: String },
    /// The bridge is gone: stop its relay (if any) and delete the lease this replica holds.
    Retire { bridge: String, lease: String },
    /// A lease nobody will use again (its bridge is gone, its holder released it or died).
    Collect { lease: String },
}

impl Step {
    /// The bridge connection this step is about (`None` for a Lease alone).
    pub fn bridge(&self) -> Option<&str> {
        match self {
            Step::Acquire { bridge }
            | Step::Release { bridge }
            | Step::Lost { bridge }
            | Step::Retire { bridge, .. } => Some(bridge),
            Step::Collect { .. } => None,
        }
    }
}

/// The steps for one round, in a fixed order: losses and releases before acquisitions, so that
/// this replica stops what it should give up before it starts anything new.
pub fn plan(view: &View<'_>) -> Vec<Step> {
    let mut steps = Vec::new();
    for bridge in &view.held {
        if let Some(l) = view.leases.get(bridge)
            && l.holder != view.me
        {
            steps.push(Step::Lost {
                bridge: bridge.clone(),
            });
        }
    }
    if !view.member {
        return steps;
    }
    let Some(bridges) = &view.bridges else {
        return steps;
    };
    let assignment = assign(bridges, &view.members);
    let lost: BTreeSet<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Lost { bridge } => Some(bridge.clone()),
            _ => None,
        })
        .collect();
    for bridge in &view.held {
        if lost.contains(bridge) {
            continue;
        }
        if !bridges.contains(bridge) {
            steps.push(Step::Retire {
                bridge: bridge.clone(),
                lease: view
                    .leases
                    .get(bridge)
                    .map(|l| l.name.clone())
                    .unwrap_or_default(),
            });
        } else if assignment.get(bridge).map(String::as_str) != Some(view.me) {
            steps.push(Step::Release {
                bridge: bridge.clone(),
            });
        }
    }
    // A Lease that names this replica although it does not run the bridge (a release that
    // failed, or claims from before a lapse) and that another member should run: let it go.
    for (bridge, lease) in &view.leases {
        if lease.holder == view.me
            && !view.held.contains(bridge)
            && bridges.contains(bridge)
            && assignment.get(bridge).map(String::as_str) != Some(view.me)
        {
            steps.push(Step::Release {
                bridge: bridge.clone(),
            });
        }
    }
    for (bridge, lease) in &view.leases {
        let abandoned = lease.holder.is_empty() || !lease.holder_alive;
        if !bridges.contains(bridge) && !view.held.contains(bridge) && abandoned {
            steps.push(Step::Collect {
                lease: lease.name.clone(),
            });
        }
    }
    for (bridge, owner) in &assignment {
        if owner != view.me || view.held.contains(bridge) {
            continue;
        }
        let free = match view.leases.get(bridge) {
            None => true,
            Some(l) => l.holder.is_empty() || l.holder == view.me || !l.holder_alive,
        };
        if free {
            steps.push(Step::Acquire {
                bridge: bridge.clone(),
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn bridges(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("ns/bridge-{i}")).collect()
    }

    fn loads(a: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for m in a.values() {
            *out.entry(m.clone()).or_default() += 1;
        }
        out
    }

    #[test]
    fn every_bridge_has_one_owner_and_loads_are_even() {
        for (n, m) in [(12, 3), (12, 4), (13, 4), (100, 7), (3, 5), (1, 1)] {
            let members: BTreeSet<String> = (0..m).map(|i| format!("pod-{i}")).collect();
            let a = assign(&bridges(n), &members);
            assert_eq!(a.len(), n, "{n} bridges over {m} members");
            let l = loads(&a);
            let cap = n.div_ceil(m);
            assert!(l.values().all(|&c| c <= cap), "{n}/{m}: {l:?}");
            if n % m == 0 {
                assert!(l.values().all(|&c| c == n / m), "{n}/{m}: {l:?}");
            }
        }
        assert!(assign(&bridges(5), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn the_assignment_does_not_depend_on_who_computes_it_or_in_which_order() {
        let members = set(&["b", "a", "c"]);
        let again: BTreeSet<String> = ["c", "a", "b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(assign(&bridges(40), &members), assign(&bridges(40), &again));
        // The hash is fixed: replicas of different builds agree.
        assert_eq!(stable_hash(&["a", "b"]), stable_hash(&["a", "b"]));
        assert_ne!(stable_hash(&["a", "b"]), stable_hash(&["ab"]));
        assert_ne!(stable_hash(&["a", "b"]), stable_hash(&["b", "a"]));
    }

    /// A member joining moves bridges only to it (plus a few the new capacity pushes around),
    /// far fewer than reshuffling all.
    #[test]
    fn a_joining_member_moves_few_bridges() {
        for n in [12usize, 120] {
            let three = set(&["pod-a", "pod-b", "pod-c"]);
            let four = set(&["pod-a", "pod-b", "pod-c", "pod-d"]);
            let before = assign(&bridges(n), &three);
            let after = assign(&bridges(n), &four);
            let moved = before.iter().filter(|(b, m)| after[*b] != **m).count();
            let to_new = after.values().filter(|m| *m == "pod-d").count();
            assert_eq!(to_new, n / 4);
            // The ideal is n/4 (only what the new member takes).
            assert!(moved <= n / 2, "{n}: moved {moved}, ideal {}", n / 4);
            // A member leaving moves only its own bridges.
            let gone = assign(&bridges(n), &set(&["pod-a", "pod-b", "pod-d"]));
            let moved_on_leave = after
                .iter()
                .filter(|(b, m)| gone[*b] != **m && *m != "pod-c")
                .count();
            assert!(moved_on_leave <= n / 4, "{n}: {moved_on_leave}");
        }
    }

    #[test]
    fn a_member_is_alive_while_its_lease_changes() {
        let d = Duration::from_secs(6);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Liveness::default();
        assert!(l.observe("m", "1", "pod", t0, d, None).alive, "first sight");
        assert!(l.observe("m", "1", "pod", t0 + s(5), d, None).alive);
        assert!(
            !l.observe("m", "1", "pod", t0 + d, d, None).alive,
            "unchanged for a lease"
        );
        assert!(l.observe("m", "2", "pod", t0 + d, d, None).alive, "renewed");
        assert!(!l.observe("m", "3", "", t0 + d, d, None).alive, "released");
        // A lease last written a minute ago, first seen now: not likely alive, but it may not
        // be taken over from before a whole duration of this replica's own watching.
        let old = l.observe("old", "7", "pod", t0, d, Some(s(60)));
        assert_eq!((old.alive, old.likely), (true, false));
        let later = l.observe("old", "7", "pod", t0 + d, d, Some(s(66)));
        assert_eq!((later.alive, later.likely), (false, false));
        // Renewed: the age on record no longer counts.
        let renewed = l.observe("old", "8", "pod", t0 + d, d, Some(s(0)));
        assert_eq!((renewed.alive, renewed.likely), (true, true));
    }

    fn lease(bridge: &str, holder: &str, alive: bool) -> (String, BridgeLease) {
        (
            bridge.to_owned(),
            BridgeLease {
                name: format!("lease-{bridge}"),
                bridge: bridge.to_owned(),
                holder: holder.to_owned(),
                holder_alive: alive,
            },
        )
    }

    /// One member: it takes every bridge whose lease is free, waits for a live holder, takes a
    /// dead holder's, and collects leases of bridges that are gone.
    #[test]
    fn a_lone_member_takes_free_and_dead_leases_and_waits_for_live_ones() {
        let view = View {
            me: "me",
            member: true,
            members: set(&["me"]),
            bridges: Some(set(&["a", "b", "c", "d", "e"])),
            leases: [
                lease("b", "", false),
                lease("c", "other", true),
                lease("d", "other", false),
                lease("e", "me", true),
                lease("gone", "", false),
                lease("gone-live", "other", true),
            ]
            .into_iter()
            .collect(),
            held: BTreeSet::new(),
        };
        let steps = plan(&view);
        let acquire = |b: &str| Step::Acquire { bridge: b.into() };
        assert_eq!(
            steps,
            vec![
                Step::Collect {
                    lease: "lease-gone".into()
                },
                acquire("a"),
                acquire("b"),
                acquire("d"),
                acquire("e"),
            ]
        );
    }

    #[test]
    fn releases_and_losses_come_before_acquisitions_and_nothing_is_acquired_unsynced() {
        let members = set(&["me", "you"]);
        let all = bridges(8);
        let a = assign(&all, &members);
        let mine: Vec<&String> = a
            .iter()
            .filter(|(_, m)| *m == "me")
            .map(|(b, _)| b)
            .collect();
        let yours: Vec<&String> = a
            .iter()
            .filter(|(_, m)| *m == "you")
            .map(|(b, _)| b)
            .collect();
        // This replica holds one of "you"'s bridges and one that "you" took from it.
        let held: BTreeSet<String> = [yours[0].clone(), yours[1].clone()].into();
        let mut leases: BTreeMap<String, BridgeLease> =
            [lease(yours[0], "me", true), lease(yours[1], "you", true)]
                .into_iter()
                .collect();
        leases.insert(mine[0].clone(), lease(mine[0], "you", true).1);
        let view = View {
            me: "me",
            member: true,
            members: members.clone(),
            bridges: Some(all.clone()),
            leases: leases.clone(),
            held: held.clone(),
        };
        let steps = plan(&view);
        assert_eq!(
            steps[..2],
            [
                Step::Lost {
                    bridge: yours[1].clone()
                },
                Step::Release {
                    bridge: yours[0].clone()
                },
            ]
        );
        // Every bridge of mine but the one "you" still holds is acquired.
        let acquired: Vec<&String> = steps[2..]
            .iter()
            .map(|s| match s {
                Step::Acquire { bridge } => bridge,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(acquired, mine[1..].to_vec());

        // Before the watch has synced, or without valid membership: only losses.
        for (member, bridges) in [(true, None), (false, Some(all))] {
            let view = View {
                me: "me",
                member,
                members: members.clone(),
                bridges,
                leases: leases.clone(),
                held: held.clone(),
            };
            assert_eq!(
                plan(&view),
                vec![Step::Lost {
                    bridge: yours[1].clone()
                }]
            );
        }
    }

    /// A claim this replica no longer runs (its release failed, or it predates a lapse) is
    /// released when another member should run the bridge, and taken up again when this one
    /// should.
    #[test]
    fn a_stray_claim_is_released_or_taken_up() {
        let members = set(&["me", "you"]);
        let all = bridges(8);
        let a = assign(&all, &members);
        let mine = a.iter().find(|(_, m)| *m == "me").map(|(b, _)| b.clone());
        let yours = a.iter().find(|(_, m)| *m == "you").map(|(b, _)| b.clone());
        let (mine, yours) = (mine.expect("mine"), yours.expect("yours"));
        let view = View {
            me: "me",
            member: true,
            members,
            bridges: Some(all),
            leases: [lease(&mine, "me", true), lease(&yours, "me", true)]
                .into_iter()
                .collect(),
            held: BTreeSet::new(),
        };
        let steps = plan(&view);
        assert!(
            steps.contains(&Step::Release { bridge: yours }),
            "{steps:?}"
        );
        assert!(steps.contains(&Step::Acquire { bridge: mine }), "{steps:?}");
    }

    #[test]
    fn a_held_bridge_that_is_gone_is_retired() {
        let view = View {
            me: "me",
            member: true,
            members: set(&["me"]),
            bridges: Some(BTreeSet::new()),
            leases: [lease("x", "me", true)].into_iter().collect(),
            held: set(&["x"]),
        };
        assert_eq!(
            plan(&view),
            vec![Step::Retire {
                bridge: "x".into(),
                lease: "lease-x".into()
            }]
        );
    }
}
