//! A time-bounded fuzzing driver over proptest strategies, for the places outside bytes come in.
//!
//! Why proptest and not cargo-fuzz: cargo-fuzz instruments with `-Zsanitizer` and needs a nightly
//! toolchain, and the build machines have only stable Rust. proptest runs on stable, generates
//! structure-aware inputs (JSON trees, header lists, mutated custom resources) and shrinks a failure to a
//! minimal input, which then becomes a regression test.
//!
//! Budget: `FUZZ_SECONDS` (run for that long, `make fuzz`) or `FUZZ_CASES` (that many inputs; default 2,000,
//! what `make test` runs). `FUZZ_SEED` replays a run; the seed is printed either way.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// Inputs per round (a fresh runner per round, so a time budget can end between rounds).
const ROUND: u32 = 500;

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

fn seed_bytes(seed: u64, round: u64) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&round.to_le_bytes());
    bytes
}

/// Runs `property` on inputs from `strategy` within the budget; panics with the shrunk input on the first
/// failure (a failed assertion or a panic inside `property`). Returns the number of inputs tried.
pub fn fuzz<S>(
    name: &str,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64
where
    S: Strategy,
    S::Value: Debug,
{
    let seed = env_num::<u64>("FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let seconds = env_num::<f64>("FUZZ_SECONDS");
    let cases = env_num::<u64>("FUZZ_CASES").unwrap_or(2000);
    let started = Instant::now();
    let deadline = seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut tried = 0u64;
    for round in 0u64.. {
        let done = match deadline {
            Some(d) => Instant::now() >= d,
            None => tried >= cases,
        };
        if done {
            break;
        }
        let config = Config {
            cases: ROUND,
            failure_persistence: None,
            ..Config::default()
        };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes(seed, round));
        let mut runner = TestRunner::new_with_rng(config, rng);
        match runner.run(&strategy, &property) {
            Ok(()) => tried += u64::from(ROUND),
            Err(TestError::Fail(reason, input)) => panic!(
                "fuzz {name}: {reason}\n  minimal input: {input:?}\n  replay: FUZZ_SEED={seed} \
                 (round {round}); add the input as a regression test"
            ),
            Err(TestError::Abort(reason)) => panic!("fuzz {name}: aborted: {reason}"),
        }
    }
    println!(
        "fuzz {name}: {tried} inputs in {:.1}s, no failure (seed {seed})",
        started.elapsed().as_secs_f64()
    );
    tried
}
