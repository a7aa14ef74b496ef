//! The `outbox-operator` binary: flags, the Kubernetes client, `/healthz` `/readyz` `/metrics`, and the
//! two controllers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use kube::api::ListParams;
use kube::Api;
use outbox::service::{config_error, exit_code, init_logging, shutdown_signal, LogFormat};
use outbox::surfaces::Surface;

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
}

struct Surfaces {
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Surface for Surfaces {
    fn readiness(&self) -> (bool, serde_json::Value) {
        let ready = self.ready.load(Ordering::Relaxed);
        (
            ready,
            serde_json::json!({ "ready": ready, "crds_served": ready }),
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
    let shutdown = shutdown_signal();
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let addr = outbox::surfaces::serve(
        args.http_addr,
        Arc::new(Surfaces {
            ready: ready.clone(),
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
    let ctx = Arc::new(Context {
        namespace: args.namespace.clone(),
        ..Context::new(
            client,
            Defaults {
                relay_image: args.relay_image,
            },
            metrics,
        )
    });
    reconcile::run(ctx, args.namespace).await;
    tracing::info!("stopped");
    Ok(())
}
