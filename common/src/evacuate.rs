//! Host evacuation's placement and ordering: which target takes which vkernel, and in which
//! order they go. Pure: the targets' capacity and compatibility come from their daemons
//! ([`crate::live::Capacity`]); the driver that moves the vkernels lives with the CLI.
//!
//! Placement is largest first, best fit (the bin-packing heuristic): the biggest vkernels are
//! the hardest to place, so they choose first, and each goes to the compatible target with the
//! least room that still holds it, which keeps large holes free for the large vkernels that
//! follow. A plan either places every vkernel or says, per vkernel left out, why.

use serde::Serialize;

/// A vkernel to move.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub name: String,
    /// Memory the destination must have for it (what its offer will claim).
    pub mem_bytes: u64,
    /// Bytes it writes per second, as sampled; for the order only.
    pub dirty_bytes_per_s: f64,
}

/// A target host as its daemon described it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// HOST:PORT, as the operator named it.
    pub addr: String,
    /// Memory it can still give to arriving vkernels.
    pub free_bytes: u64,
    /// Per item (same index): `None` if it can run it (memory aside), else why not.
    pub refusals: Vec<Option<String>>,
}

/// Where each vkernel goes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    /// (item index, target index), in the order the migrations should start.
    pub moves: Vec<(usize, usize)>,
    /// (item index, why no target can take it), by item index.
    pub unplaced: Vec<(usize, String)>,
}

impl Plan {
    pub fn fits(&self) -> bool {
        self.unplaced.is_empty()
    }

    /// The target of item `i`, if it has one.
    pub fn target_of(&self, i: usize) -> Option<usize> {
        self.moves.iter().find(|m| m.0 == i).map(|m| m.1)
    }
}

/// Place every item: largest first, best fit, on the targets that can run it; then order the
/// moves so that the items that write memory fastest go first (they are the ones whose
/// migration gets harder the longer they wait next to other migrations' traffic, and an
/// evacuation that fails should fail on them early).
pub fn plan(items: &[Item], targets: &[Target]) -> Plan {
    let mut room: Vec<u64> = targets.iter().map(|t| t.free_bytes).collect();
    let mut by_size: Vec<usize> = (0..items.len()).collect();
    // Stable on ties: the operator's order (by name) decides.
    by_size.sort_by(|&a, &b| items[b].mem_bytes.cmp(&items[a].mem_bytes));
    let mut plan = Plan::default();
    for i in by_size {
        match best_fit(&items[i], i, targets, &room, &[]) {
            Ok(t) => {
                room[t] -= items[i].mem_bytes;
                plan.moves.push((i, t));
            }
            Err(reason) => plan.unplaced.push((i, reason)),
        }
    }
    plan.moves.sort_by(|a, b| order(&items[a.0], &items[b.0]));
    plan.unplaced.sort_by_key(|u| u.0);
    plan
}

/// Fastest writer first; among equals the larger first (it takes longer), then by name.
pub fn order(a: &Item, b: &Item) -> std::cmp::Ordering {
    b.dirty_bytes_per_s
        .total_cmp(&a.dirty_bytes_per_s)
        .then(b.mem_bytes.cmp(&a.mem_bytes))
        .then(a.name.cmp(&b.name))
}

/// The target for item `i` (`item`): among those that can run it, are not in `exclude` and
/// have room for it, the one with the least room. `room` is per target. Otherwise why none.
pub fn best_fit(
    item: &Item,
    i: usize,
    targets: &[Target],
    room: &[u64],
    exclude: &[usize],
) -> Result<usize, String> {
    let mut why: Vec<String> = Vec::new();
    let mut best: Option<usize> = None;
    for (t, target) in targets.iter().enumerate() {
        if exclude.contains(&t) {
            why.push(format!("{}: already failed or unreachable", target.addr));
            continue;
        }
        if let Some(Some(reason)) = target.refusals.get(i) {
            why.push(format!("{}: {reason}", target.addr));
            continue;
        }
        if target.refusals.get(i).is_none() {
            why.push(format!(
                "{}: did not say whether it can run it",
                target.addr
            ));
            continue;
        }
        let r = room.get(t).copied().unwrap_or(0);
        if r < item.mem_bytes {
            why.push(format!("{}: {} MiB left", target.addr, r >> 20));
            continue;
        }
        if best.is_none_or(|b| r < room[b]) {
            best = Some(t);
        }
    }
    best.ok_or_else(|| {
        if targets.is_empty() {
            "no targets".to_owned()
        } else {
            format!(
                "no target can take it (it needs {} MiB): {}",
                item.mem_bytes.div_ceil(1 << 20),
                why.join("; ")
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn item(name: &str, mib: u64, dirty: f64) -> Item {
        Item {
            name: name.into(),
            mem_bytes: mib * MIB,
            dirty_bytes_per_s: dirty,
        }
    }

    fn target(addr: &str, mib: u64, n: usize) -> Target {
        Target {
            addr: addr.into(),
            free_bytes: mib * MIB,
            refusals: vec![None; n],
        }
    }

    fn names(items: &[Item], t: usize, p: &Plan) -> Vec<String> {
        let mut v: Vec<String> = p
            .moves
            .iter()
            .filter(|m| m.1 == t)
            .map(|m| items[m.0].name.clone())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn largest_first_best_fit_places_what_first_fit_would_not() {
        // First fit in the given order puts a (50) on B (100), b (60) on C, and then has no
        // room for c (80).
        let items = [item("a", 50, 0.0), item("b", 60, 0.0), item("c", 80, 0.0)];
        let targets = [target("B", 100, 3), target("C", 110, 3)];
        let p = plan(&items, &targets);
        assert!(p.fits(), "{p:?}");
        // c (80) first: B (100) is the tighter fit; then b (60) and a (50) fit only on C.
        assert_eq!(names(&items, 0, &p), ["c"]);
        assert_eq!(names(&items, 1, &p), ["a", "b"]);
    }

    #[test]
    fn best_fit_keeps_the_big_hole_for_what_needs_it() {
        // c (60) takes C, which it fills exactly; a and b share B. Placing c where there is
        // most room (B) would leave 40 there and 60 on C: room for one 50, not two.
        let items = [item("a", 50, 0.0), item("b", 50, 0.0), item("c", 60, 0.0)];
        let targets = [target("B", 100, 3), target("C", 60, 3)];
        let p = plan(&items, &targets);
        assert!(p.fits(), "{p:?}");
        assert_eq!(names(&items, 0, &p), ["a", "b"]);
        assert_eq!(names(&items, 1, &p), ["c"]);
    }

    #[test]
    fn fastest_writers_go_first() {
        let items = [
            item("idle", 10, 0.0),
            item("fast", 10, 50e6),
            item("slow", 10, 1e6),
            item("big-idle", 20, 0.0),
        ];
        let p = plan(&items, &[target("B", 1000, 4)]);
        let order: Vec<&str> = p.moves.iter().map(|m| items[m.0].name.as_str()).collect();
        assert_eq!(order, ["fast", "slow", "big-idle", "idle"]);
    }

    #[test]
    fn a_plan_that_cannot_fit_says_why_per_vkernel() {
        let items = [item("a", 40, 0.0), item("b", 40, 0.0), item("c", 40, 0.0)];
        let mut b = target("B", 50, 3);
        b.refusals[2] = Some("another CPU state layout".into());
        let targets = [b, target("C", 50, 3)];
        let p = plan(&items, &targets);
        assert!(!p.fits());
        assert_eq!(p.moves.len(), 2);
        assert_eq!(p.unplaced.len(), 1);
        let (i, why) = &p.unplaced[0];
        // a and b take the room; c could only go to C, which is full.
        assert_eq!(items[*i].name, "c");
        assert!(why.contains("B: another CPU state layout"), "{why}");
        assert!(why.contains("C: 10 MiB left"), "{why}");
        assert!(why.contains("needs 40 MiB"), "{why}");
    }

    #[test]
    fn a_retry_avoids_the_targets_that_failed() {
        let items = [item("a", 10, 0.0)];
        let targets = [target("B", 100, 1), target("C", 20, 1)];
        let room = [100 * MIB, 20 * MIB];
        assert_eq!(best_fit(&items[0], 0, &targets, &room, &[]), Ok(1));
        assert_eq!(best_fit(&items[0], 0, &targets, &room, &[1]), Ok(0));
        let err = best_fit(&items[0], 0, &targets, &room, &[0, 1]).expect_err("none left");
        assert!(err.contains("already failed"), "{err}");
    }

    #[test]
    fn nothing_to_place_is_a_plan_that_fits() {
        let p = plan(&[], &[target("B", 1, 0)]);
        assert!(p.fits() && p.moves.is_empty());
        let p = plan(&[item("a", 1, 0.0)], &[]);
        assert_eq!(p.unplaced, vec![(0, "no targets".to_owned())]);
    }
}
