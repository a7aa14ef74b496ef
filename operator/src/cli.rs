//! The `outbox-operator` binary: flags, the Kubernetes client, `/healthz` `/readyz` `/metrics`, leader
//! election, and the two controllers.
//!
//! Replicas elect one leader through a Lease (`lease-election`, the same rules as the relay's); only the
//! leader runs the controllers, the others stand by and report Ready. A leader that loses the Lease stops
//! reconciling at once and exits (as client-go's leader election does), so its restart stands again
//! instead of resuming with a stale cache.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kube::api::ListParams;
use kube::Api;
use lease_election::{Candidate, LeaseClient, Observer, Timings};
use process_kit::service::{config_error, exit_code, init_logging, shutdown_signal, LogFormat};
use process_kit::surfaces::Surface;

use crate::crd::{ConsumerGroup, OutboxRelay};
use crate::metrics::Metrics;
use crate::plan::Defaults;
use crate::reconcile::{self, Context};

/// Runs the outbox operator against the cluster of the in-cluster service account or the kubeconfig.
#[derive(Debug, Parser)]
#[command(name = "outbox-operator", version)]
pub struct Args {
    /// Relay image for OutboxRelays that name none.
    #[arg(long, env = "OPERATOR_RELAY_IMAGE", default_value = concat!("ghcr.io/outbox-operator/outbox-relay:", env!("CARGO_PKG_VERSION")))]
    pub relay_image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Elect one reconciling replica through a Lease. `false`: this process reconciles without asking
    /// (run exactly one then).
    #[arg(long, env = "OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the leader Lease (default: `POD_NAMESPACE`, else the kubeconfig's namespace).
    #[arg(long, env = "OPERATOR_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "OPERATOR_LEADER_ELECTION_LEASE",
        default_value = "outbox-operator"
    )]
    pub leader_election_lease: String,
    /// This replica's name in the Lease and in Events (default: `POD_NAME`, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the leader Lease stays valid without renewal.
    #[arg(long, env = "OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// The leader stops reconciling (and exits) when it could not renew for this long.
    #[arg(long, env = "OPERATOR_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,
    /// Pause between Lease attempts.
    #[arg(long, env = "OPERATOR_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_period: Duration,
}

/// Leader metrics and the readiness document's `leader` field, from the election's reports.
struct LeaderObserver {
    leader: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Observer for LeaderObserver {
    fn lease_written(&self, outcome: &'static str, _: Duration) {
        self.metrics
            .lease_writes
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: outcome.into(),
            })
            .inc();
    }

    fn leading(&self, _: i64) {
        self.leader.store(true, Ordering::Relaxed);
        self.metrics.leader.set(1);
    }

    fn stopped_leading(&self) {
        self.leader.store(false, Ordering::Relaxed);
        self.metrics.leader.set(0);
    }
}

struct Surfaces {
    ready: Arc<AtomicBool>,
    leader: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Surface for Surfaces {
    // A standby is Ready too: a rolling update waits for Ready pods, and a standby is what takes over.
    fn readiness(&self) -> (bool, serde_json::Value) {
        let ready = self.ready.load(Ordering::Relaxed);
        let leader = self.leader.load(Ordering::Relaxed);
        (
            ready,
            serde_json::json!({ "ready": ready, "crds_served": ready, "leader": leader }),
        )
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// Entry point of the binary.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    exit_code("outbox-operator", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Two TLS backends are linked (kube's rustls and librdkafka's); rustls needs the choice made once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let timings = Timings {
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    if let Err(why) = timings.validate() {
        return Err(config_error(
            "--lease-duration/--renew-deadline/--retry-period",
            "OPERATOR_LEASE_DURATION/OPERATOR_RENEW_DEADLINE/OPERATOR_RETRY_PERIOD",
            why,
        ));
    }
    let shutdown = shutdown_signal();
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let leader = Arc::new(AtomicBool::new(false));
    let addr = process_kit::surfaces::serve(
        args.http_addr,
        Arc::new(Surfaces {
            ready: ready.clone(),
            leader: leader.clone(),
            metrics: metrics.clone(),
        }),
        shutdown.clone(),
    )
    .await
    .map_err(|e| config_error("--http-addr", "OPERATOR_HTTP_ADDR", e))?;
    let config = kube::Config::infer().await.map_err(|e| {
        config_error(
            "--kubeconfig",
            "KUBECONFIG",
            format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}"),
        )
    })?;
    let lease_namespace = args
        .leader_election_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    tracing::info!("outbox-operator serving /healthz /readyz /metrics on http://{addr}");
    // Ready once the API server serves both CRDs (`kubectl apply -f crds/` done).
    let probe = client.clone();
    tokio::spawn(async move {
        let lp = ListParams::default().limit(1);
        loop {
            let relays = Api::<OutboxRelay>::all(probe.clone()).list(&lp).await;
            let groups = Api::<ConsumerGroup>::all(probe.clone()).list(&lp).await;
            match (relays, groups) {
                (Ok(_), Ok(_)) => {
                    ready.store(true, Ordering::Relaxed);
                    return;
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!("CRDs not served yet (kubectl apply -f crds/): {e}")
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
    });
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "outbox-operator".into());
        format!("{host}-{}", std::process::id())
    });
    let ctx = Arc::new(Context {
        namespace: args.namespace.clone(),
        ..Context::new(
            client.clone(),
            Defaults {
                relay_image: args.relay_image,
            },
            metrics.clone(),
        )
        .reporting_as(&identity)
    });
    if !args.leader_election {
        tracing::warn!("leader election off: this replica reconciles without asking; run only one");
        leader.store(true, Ordering::Relaxed);
        metrics.leader.set(1);
        reconcile::run(ctx, args.namespace).await;
        tracing::info!("stopped");
        return Ok(());
    }
    let lease = format!("{lease_namespace}/{}", args.leader_election_lease);
    let mut candidate = Candidate::new(
        LeaseClient::new(
            client,
            &lease_namespace,
            args.leader_election_lease.clone(),
            identity.clone(),
            timings,
        ),
        Arc::new(LeaderObserver {
            leader,
            metrics: metrics.clone(),
        }),
    );
    tracing::info!(%lease, %identity, "standing for leader");
    let Some(epoch) = candidate.acquire(&shutdown).await else {
        tracing::info!("stopped (standby)");
        return Ok(());
    };
    tracing::info!(%lease, %identity, epoch, "leading: reconciling");
    let held = candidate.keep(epoch);
    let lost = held.lost();
    tokio::select! {
        _ = reconcile::run(ctx, args.namespace) => {
            // SIGTERM: the controllers finished; hand the Lease over so a standby need not wait for it
            // to expire.
            held.release().await;
            tracing::info!("stopped");
            Ok(())
        }
        _ = lost.cancelled() => Err(anyhow::anyhow!(
            "lost the leader Lease {lease}; stopped reconciling, exiting so the restart stands again"
        )),
    }
}
