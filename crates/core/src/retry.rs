//! The retry policy of a stage: how many attempts, how long each may take, and how long to wait
//! between them (exponential backoff with full jitter).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    pub max_attempts: u32,
    /// The ceiling of the first backoff; each later ceiling doubles.
    pub base_delay: Duration,
    /// No backoff ceiling grows past this.
    pub max_delay: Duration,
    /// How long one attempt may run before it counts as a transient failure.
    pub timeout: Duration,
}

impl RetryPolicy {
    /// The ceiling of the wait after failed attempt `attempt` (1-based): `base * 2^(attempt-1)`,
    /// capped at `max_delay`. The schedule comes from `backon`'s exponential builder.
    pub fn ceiling_after(&self, attempt: u32) -> Duration {
        if self.base_delay.is_zero() {
            return Duration::ZERO;
        }
        ExponentialBuilder::default()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay.max(self.base_delay))
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay)
    }

    /// The wait after failed attempt `attempt`: uniformly random between zero and the ceiling
    /// ("full jitter"), so retries of many runs that failed together spread out.
    pub fn delay_after(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling_after(attempt).as_millis() as u64;
        Duration::from_millis(rng.random_range(0..=ceiling))
    }

    /// Whether another attempt may follow attempt `attempt`.
    pub fn allows_another_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn ceilings_double_up_to_the_maximum() {
        let policy = policy();
        let ceilings: Vec<u128> = (1..=6)
            .map(|a| policy.ceiling_after(a).as_millis())
            .collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn delays_are_full_jitter_under_the_ceiling() {
        let policy = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 1..=5 {
            let mut seen = Vec::new();
            for _ in 0..200 {
                let delay = policy.delay_after(attempt, &mut rng);
                assert!(delay <= policy.ceiling_after(attempt));
                seen.push(delay.as_millis());
            }
            let mean = seen.iter().sum::<u128>() as f64 / seen.len() as f64;
            let half = policy.ceiling_after(attempt).as_millis() as f64 / 2.0;
            assert!(
                (mean - half).abs() < half * 0.25,
                "mean {mean} far from {half}"
            );
        }
    }

    #[test]
    fn attempts_are_bounded() {
        let policy = policy();
        assert!(policy.allows_another_after(4));
        assert!(!policy.allows_another_after(5));
    }
}
