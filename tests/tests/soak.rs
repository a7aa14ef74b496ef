//! The short chaos soak (the long one is `make soak`): a few thousand orders while every kind of fault is
//! injected at least once — relay leader and standby SIGKILLed, a consumer SIGKILLed, the leader paused past
//! its renew deadline, PostgreSQL crashed and restarted, the broker taken down (briefly, and for longer than
//! the relays' attempts × delivery timeout), the API crashed right after a commit, a hot key committing
//! late, a poison event redriven and discarded. The ledger must show nothing lost, nothing applied twice,
//! nothing dead-lettered, and every key's events in commit order on the topic and in the effects.

use std::time::Duration;

use e2e::chaos::{Bounds, Fault};
use e2e::soak::{run, Coordination, SoakOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_kind_once_under_load_loses_nothing_and_applies_nothing_twice() {
    // A seed per run widens what CI explores; the line printed names it for a replay (`make soak SEED=…`).
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()));
    let report = run(SoakOptions {
        orders: 3000,
        seed,
        rate: 150.0,
        min_faults: Fault::ALL.len(),
        bounds: Bounds {
            min_wait: Duration::from_millis(500),
            max_wait: Duration::from_millis(1500),
            max_hold: Duration::from_millis(1500),
        },
        coordination: Coordination::Lease,
        settle_timeout: Duration::from_secs(120),
        ..SoakOptions::default()
    })
    .await
    .unwrap();
    println!("{}", report.line());
    assert!(
        report.violations().is_empty(),
        "{}: {:?}",
        report.line(),
        report.violations()
    );
    for kind in Fault::ALL {
        assert!(
            report.faults.get(&kind).copied().unwrap_or(0) >= 1,
            "{kind} was not injected: {}",
            report.line()
        );
    }
    assert!(report.orders >= 3000, "{}", report.line());
    assert_eq!(report.acknowledged, 3000, "{}", report.line());
    assert_eq!(report.coordination, "lease");
}
