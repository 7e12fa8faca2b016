//! Which live replica runs which active tenant. Every replica computes the same plan from the
//! same rows, so they agree without talking to each other:
//!
//! - no replica gets more than ⌈T/N⌉ tenants (T active tenants, N replicas taking tenants),
//!   nor more than its own cap (`MAX_TENANTS`): what a capped replica cannot take is shared
//!   by the others, and tenants beyond every cap are placed nowhere;
//! - a tenant stays where it runs while that replica is within the cap, so a replica that joins
//!   takes only the excess of the others, and one that leaves gives away only its own;
//! - the others go to the replica that scores highest for them (rendezvous hashing) among those
//!   with room, so the plan does not depend on the order replicas joined in.

use std::collections::HashMap;

use crate::ids::TenantId;

/// A tenant to place, with the replica that runs it now (when that one takes tenants).
pub struct Placed<'a> {
    pub tenant: TenantId,
    pub owner: Option<&'a str>,
}

/// Tenant → replica for every tenant in `tenants`, over `replicas` (those taking tenants).
#[cfg(test)]
pub fn plan<'r>(tenants: &[Placed], replicas: &[&'r str]) -> HashMap<TenantId, &'r str> {
    plan_capped(tenants, replicas, &vec![None; replicas.len()])
}

/// As `plan`, each replica taking at most its cap (`caps[i]` for `replicas[i]`, `None`: no cap).
pub fn plan_capped<'r>(
    tenants: &[Placed],
    replicas: &[&'r str],
    caps: &[Option<usize>],
) -> HashMap<TenantId, &'r str> {
    let mut plan = HashMap::with_capacity(tenants.len());
    if replicas.is_empty() {
        return plan;
    }
    let cap = shares(tenants.len(), caps);
    let mut load = vec![0usize; replicas.len()];
    let index = |name: &str| replicas.iter().position(|r| *r == name);

    // Keep tenants where they run, the most strongly preferred first, up to the cap.
    let mut kept: Vec<(u64, TenantId, usize)> = tenants
        .iter()
        .filter_map(|p| {
            let r = index(p.owner?)?;
            Some((score(replicas[r], p.tenant), p.tenant, r))
        })
        .collect();
    kept.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, tenant, r) in kept {
        if load[r] < cap[r] {
            load[r] += 1;
            plan.insert(tenant, replicas[r]);
        }
    }

    // The rest: the best-scoring replica with room.
    let mut rest: Vec<TenantId> = tenants
        .iter()
        .map(|p| p.tenant)
        .filter(|t| !plan.contains_key(t))
        .collect();
    rest.sort_unstable();
    for tenant in rest {
        let best = (0..replicas.len())
            .filter(|&r| load[r] < cap[r])
            .max_by_key(|&r| (score(replicas[r], tenant), std::cmp::Reverse(r)));
        if let Some(r) = best {
            load[r] += 1;
            plan.insert(tenant, replicas[r]);
        }
    }
    plan
}

/// How many of `total` tenants each replica may hold: ⌈T/N⌉ each, except that a replica
/// whose own cap is lower holds only that, the rest shared alike by the others (in turns, so
/// every replica computes the same from the same caps).
fn shares(total: usize, caps: &[Option<usize>]) -> Vec<usize> {
    let mut share = vec![0; caps.len()];
    let mut open: Vec<usize> = (0..caps.len()).collect();
    let mut left = total;
    while !open.is_empty() {
        let fair = left.div_ceil(open.len());
        let (low, high): (Vec<usize>, Vec<usize>) = open
            .iter()
            .partition(|&&r| caps[r].is_some_and(|c| c < fair));
        if low.is_empty() {
            for r in high {
                share[r] = fair;
            }
            break;
        }
        for r in low {
            let c = caps[r].unwrap_or(0);
            share[r] = c;
            left = left.saturating_sub(c);
        }
        open = high;
    }
    share
}

/// How much `replica` wants `tenant`: a hash of both that is the same on every build and
/// machine (std's hasher promises neither), so replicas of different versions agree.
fn score(replica: &str, tenant: TenantId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = replica
        .bytes()
        .chain([0xff])
        .chain(tenant.uuid().into_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // murmur3's finalizer: FNV alone mixes the last bytes poorly.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants(n: u128) -> Vec<TenantId> {
        (1..=n)
            .map(|i| uuid::Uuid::from_u128(i * 0x9e37_79b9_7f4a_7c15).into())
            .collect()
    }

    fn place<'a>(ts: &[TenantId], owners: &HashMap<TenantId, &'a str>) -> Vec<Placed<'a>> {
        ts.iter()
            .map(|t| Placed {
                tenant: *t,
                owner: owners.get(t).copied(),
            })
            .collect()
    }

    fn loads(plan: &HashMap<TenantId, &str>, replicas: &[&str]) -> Vec<usize> {
        replicas
            .iter()
            .map(|r| plan.values().filter(|v| *v == r).count())
            .collect()
    }

    #[test]
    fn every_tenant_is_placed_and_no_replica_exceeds_the_cap() {
        for (t, replicas) in [
            (30, vec!["a", "b", "c"]),
            (7, vec!["a", "b"]),
            (1000, vec!["x", "y", "z", "w"]),
        ] {
            let ts = tenants(t);
            let plan = plan(&place(&ts, &HashMap::new()), &replicas);
            assert_eq!(plan.len(), ts.len());
            let cap = ts.len().div_ceil(replicas.len());
            assert!(
                loads(&plan, &replicas).iter().all(|&l| l <= cap),
                "{:?}",
                loads(&plan, &replicas)
            );
        }
    }

    #[test]
    fn a_joining_replica_takes_only_the_excess_and_a_leaving_one_gives_only_its_own() {
        let ts = tenants(300);
        let two = ["a", "b"];
        let first = plan(&place(&ts, &HashMap::new()), &two);
        let three = ["a", "b", "c"];
        let joined = plan(&place(&ts, &first), &three);
        let moved = ts.iter().filter(|t| first[*t] != joined[*t]).count();
        assert_eq!(moved, 100, "exactly c's share moves");
        assert!(ts
            .iter()
            .filter(|t| first[*t] != joined[*t])
            .all(|t| joined[t] == "c"));

        let left = plan(&place(&ts, &joined), &["a", "c"]);
        let moved: Vec<_> = ts.iter().filter(|t| joined[*t] != left[*t]).collect();
        assert!(
            moved.iter().all(|t| joined[*t] == "b"),
            "only b's tenants move"
        );
        assert_eq!(loads(&left, &["a", "c"]), vec![150, 150]);
    }

    #[test]
    fn a_capped_replica_takes_no_more_than_its_cap_and_the_others_share_the_rest() {
        let ts = tenants(30);
        let replicas = ["a", "b", "c"];
        let plan = plan_capped(
            &place(&ts, &HashMap::new()),
            &replicas,
            &[Some(4), None, None],
        );
        assert_eq!(plan.len(), 30);
        assert_eq!(loads(&plan, &replicas), vec![4, 13, 13]);
        // Every cap below what there is: the excess is placed nowhere.
        let plan = plan_capped(&place(&ts, &HashMap::new()), &replicas, &[Some(5); 3]);
        assert_eq!(loads(&plan, &replicas), vec![5, 5, 5]);
    }

    #[test]
    fn the_plan_is_the_same_whatever_order_the_inputs_come_in() {
        let ts = tenants(50);
        let mut reversed = ts.clone();
        reversed.reverse();
        let a = plan(&place(&ts, &HashMap::new()), &["a", "b", "c"]);
        let b = plan(&place(&reversed, &HashMap::new()), &["a", "b", "c"]);
        assert_eq!(a, b);
    }

    #[test]
    fn scores_are_stable_across_builds() {
        let t: TenantId = "2a7a0324-8118-4e0a-9699-35c1ca694c2e".parse().unwrap();
        assert_eq!(score("replica-1", t), score("replica-1", t));
        assert_ne!(score("replica-1", t), score("replica-2", t));
        // Pinned: a change here would make replicas of two builds disagree on the plan.
        assert_eq!(score("replica-1", t), 10_283_106_484_263_930_013);
    }
}
