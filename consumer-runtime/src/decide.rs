//! Pure decisions: what to do with a message after its handler ran.

use std::time::Duration;

/// A handler's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying (a lock timeout, a downstream service briefly unavailable).
    #[error("retriable: {0}")]
    Retriable(String),
    /// Will fail the same way every time (invalid payload, business rule): goes to the DLQ at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// What the runtime does next with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Effects committed (or a duplicate skipped): store the offset.
    Done,
    /// Pause the partition, rewind to this message, try again after the delay.
    RetryAfter(Duration),
    /// Publish to the DLQ with this reason, then store the offset.
    DeadLetter(String),
}

/// Retry settings.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Handler attempts before the message goes to the DLQ (the first counts).
    pub max_attempts: u32,
    /// First backoff; doubles per attempt.
    pub backoff_base: Duration,
    /// Backoff ceiling.
    pub backoff_max: Duration,
}

/// Decides after attempt number `attempt` (1-based) ended with `result`. `unit` is a random number in
/// [0, 1) for jitter.
pub fn after_attempt(
    result: &Result<(), HandlerError>,
    attempt: u32,
    policy: &RetryPolicy,
    unit: f64,
) -> Next {
    match result {
        Ok(()) => Next::Done,
        Err(HandlerError::Permanent(e)) => Next::DeadLetter(format!("permanent: {e}")),
        Err(HandlerError::Retriable(e)) if attempt >= policy.max_attempts => {
            Next::DeadLetter(format!("gave up after {attempt} attempts: {e}"))
        }
        Err(HandlerError::Retriable(_)) => Next::RetryAfter(backoff(attempt, policy, unit)),
    }
}

/// Exponential backoff with equal jitter, capped.
pub fn backoff(attempt: u32, policy: &RetryPolicy, unit: f64) -> Duration {
    let nominal =
        process_kit::backoff::exponential(policy.backoff_base, policy.backoff_max, attempt);
    process_kit::backoff::equal_jitter(nominal, unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
    };

    #[test]
    fn success_permanent_and_retriable() {
        assert_eq!(after_attempt(&Ok(()), 1, &P, 0.0), Next::Done);
        assert_eq!(
            after_attempt(&Err(HandlerError::Permanent("bad".into())), 1, &P, 0.0),
            Next::DeadLetter("permanent: bad".into())
        );
        assert_eq!(
            after_attempt(&Err(HandlerError::Retriable("x".into())), 1, &P, 0.0),
            Next::RetryAfter(Duration::from_millis(50))
        );
        assert_eq!(
            after_attempt(&Err(HandlerError::Retriable("x".into())), 2, &P, 0.0),
            Next::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            after_attempt(&Err(HandlerError::Retriable("x".into())), 3, &P, 0.0),
            Next::DeadLetter("gave up after 3 attempts: x".into())
        );
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(30, &P, 0.0), Duration::from_millis(500));
        assert!(backoff(30, &P, 0.99) < Duration::from_secs(1));
    }
}
