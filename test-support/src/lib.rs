//! Real servers for tests and benchmarks, started on free loopback ports and torn down afterwards:
//! a throwaway PostgreSQL cluster per process ([`pg`]), librdkafka's in-process mock cluster and a tansu
//! broker ([`kafka`]) with an optional TLS listener (stunnel) in front, an Apache Kafka cluster of 1 or 3
//! KRaft nodes ([`apache`], feature `apache-kafka`), a real Kubernetes control plane
//! ([`control_plane`], feature `control-plane`) and test certificate authorities ([`tls`], feature `tls`) and a time-bounded fuzzing driver
//! ([`fuzz`], feature `fuzz`), and a TCP proxy that adds network latency on loopback ([`delay_proxy`]).
//! [`cli`] runs a binary and checks how it refuses bad settings; [`history`] holds what a topic has against
//! what was written (lost, duplicated, reordered).
//! Nothing here touches a shared system database or a non-loopback address.

#[cfg(feature = "apache-kafka")]
pub mod apache;
pub mod cli;
#[cfg(feature = "control-plane")]
pub mod control_plane;
pub mod delay_proxy;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod history;
pub mod kafka;
pub mod pg;
pub mod prometheus;
pub mod reaper;
#[cfg(feature = "tls")]
pub mod tls;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// The cache `scripts/setup.sh` installs tools into: `$OUTBOX_CACHE`, else `~/.cache/outbox-operator`.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("OUTBOX_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/outbox-operator")
        })
}

/// A free TCP port on 127.0.0.1 (bound then released; the window for a race is tiny).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Sums the samples of metric `name` in Prometheus/OpenMetrics text, over all label sets (a longer
/// name that starts with `name` is another metric and does not count).
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_values_sum_label_sets_and_ignore_longer_names() {
        let text = "# HELP x\nm_total 3\nm_total{a=\"1\"} 2\nm_total_more 9\n";
        assert_eq!(super::metric_value(text, "m_total"), 5.0);
    }
}
