//! The one backoff curve of the product: a base delay doubling per attempt up to a ceiling. Retries of
//! events (relay), of records (consumers), of unreachable dependencies and of failed reconciles all use
//! it; callers that spread load add jitter on top ([`equal_jitter`]).

use std::time::Duration;

/// The delay before retry number `attempt` (1 = the first retry): `base · 2^(attempt−1)`, at most `max`.
pub fn exponential(base: Duration, max: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(32);
    base.saturating_mul(2u32.saturating_pow(doublings)).min(max)
}

/// Half of `delay` fixed and half random (`random` in [0, 1)), so retries of many callers spread out
/// without ever waiting less than half the curve.
pub fn equal_jitter(delay: Duration, random: f64) -> Duration {
    let half = delay / 2;
    half + half.mul_f64(random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_up_to_the_ceiling() {
        let ms = Duration::from_millis;
        let d = |n| exponential(ms(500), Duration::from_secs(30), n);
        assert_eq!(d(0), ms(500));
        assert_eq!(d(1), ms(500));
        assert_eq!(d(2), ms(1000));
        assert_eq!(d(7), ms(30_000));
        assert_eq!(d(u32::MAX), ms(30_000), "no overflow");
    }

    #[test]
    fn equal_jitter_keeps_at_least_half() {
        let d = Duration::from_secs(8);
        assert_eq!(equal_jitter(d, 0.0), Duration::from_secs(4));
        assert_eq!(equal_jitter(d, 1.0), Duration::from_secs(8));
        assert!(equal_jitter(d, 0.5) > Duration::from_secs(5));
    }
}
