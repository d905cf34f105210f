//! How one claim is shared between queues (tenants) that all have work.
//!
//! Each queue gets `n * weight / total` slots, rounded down; the slots left
//! over go to queues drawn at random in proportion to what rounding took
//! from them. So a claim of 100 over queues weighted 1 and 1 takes 50 from
//! each, and claims of 1 alternate between them at random: over many claims
//! every queue's share tends to its weight, whatever its backlog. Slots a
//! queue cannot fill are topped up from the others by the claim statement.

use rand::Rng;

/// Splits `n` claim slots between `queues` (name, weight ≥ 1) in proportion
/// to their weights. Queues that get no slot are left out.
pub fn shares(n: u32, queues: &[(String, i32)], rng: &mut impl Rng) -> Vec<(String, u32)> {
    let total: u64 = queues
        .iter()
        .map(|(_, w)| u64::from(w.max(&1).unsigned_abs()))
        .sum();
    if total == 0 || n == 0 {
        return Vec::new();
    }
    let mut slots: Vec<u32> = Vec::with_capacity(queues.len());
    let mut leftover: Vec<f64> = Vec::with_capacity(queues.len());
    for (_, weight) in queues {
        let exact = f64::from(n) * f64::from((*weight).max(1)) / total as f64;
        slots.push(exact.floor() as u32);
        leftover.push(exact - exact.floor());
    }
    let mut remaining = n.saturating_sub(slots.iter().sum());
    while remaining > 0 {
        let sum: f64 = leftover.iter().sum();
        if sum <= 0.0 {
            break;
        }
        let mut draw = rng.random_range(0.0..sum);
        let chosen = leftover
            .iter()
            .position(|&l| {
                draw -= l;
                l > 0.0 && draw < 0.0
            })
            .unwrap_or_else(|| leftover.iter().rposition(|&l| l > 0.0).unwrap_or(0));
        slots[chosen] += 1;
        leftover[chosen] = 0.0;
        remaining -= 1;
    }
    queues
        .iter()
        .zip(slots)
        .filter(|(_, n)| *n > 0)
        .map(|((queue, _), n)| (queue.clone(), n))
        .collect()
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn queues(weights: &[i32]) -> Vec<(String, i32)> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("q{i}"), *w))
            .collect()
    }

    fn slots_of(shares: &[(String, u32)], queue: &str) -> u32 {
        shares
            .iter()
            .find(|(q, _)| q == queue)
            .map_or(0, |(_, n)| *n)
    }

    #[test]
    fn equal_weights_split_a_claim_evenly() {
        let s = shares(100, &queues(&[1, 1]), &mut StdRng::seed_from_u64(1));
        assert_eq!((slots_of(&s, "q0"), slots_of(&s, "q1")), (50, 50));
    }

    #[test]
    fn weights_set_the_split() {
        let s = shares(100, &queues(&[3, 1]), &mut StdRng::seed_from_u64(1));
        assert_eq!((slots_of(&s, "q0"), slots_of(&s, "q1")), (75, 25));
    }

    #[test]
    fn every_slot_is_handed_out_and_no_more() {
        let mut rng = StdRng::seed_from_u64(7);
        for n in [1, 2, 3, 7, 10, 99, 100, 1000] {
            for weights in [&[1][..], &[1, 1, 1], &[5, 1, 2, 9], &[1; 40]] {
                let total: u32 = shares(n, &queues(weights), &mut rng)
                    .iter()
                    .map(|(_, n)| n)
                    .sum();
                assert_eq!(total, n, "n={n} weights={weights:?}");
            }
        }
    }

    #[test]
    fn single_slot_claims_visit_every_queue_in_proportion_to_weight() {
        let mut rng = StdRng::seed_from_u64(42);
        let qs = queues(&[1, 1, 2]);
        let mut counts = [0u32; 3];
        for _ in 0..4000 {
            let s = shares(1, &qs, &mut rng);
            assert_eq!(s.len(), 1);
            counts[s[0].0[1..].parse::<usize>().unwrap()] += 1;
        }
        // Expected 1000, 1000, 2000; allow generous sampling noise.
        assert!((850..1150).contains(&counts[0]), "{counts:?}");
        assert!((850..1150).contains(&counts[1]), "{counts:?}");
        assert!((1800..2200).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn no_queues_or_no_slots_share_nothing() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(shares(10, &[], &mut rng).is_empty());
        assert!(shares(0, &queues(&[1]), &mut rng).is_empty());
    }
}
