//! `outbox-relay run`: the composition root — database pool, producer, coordinator (single, Lease,
//! competing), relay loop, probes and metrics, the status reporter — then run until SIGTERM.

use super::*;

pub(super) async fn run(
    args: RunArgs,
    opts: PgConnectOptions,
    schema: SchemaName,
) -> anyhow::Result<()> {
    let kafka = kafka_settings(&args.kafka)?;
    if args.backoff_base > args.backoff_max {
        return Err(config_error(
            "--backoff-base",
            "RELAY_BACKOFF_BASE",
            "must not exceed --backoff-max",
        ));
    }
    let timings = Timings {
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    if let Err(why) = timings.validate() {
        return Err(config_error(
            "--lease-duration/--renew-deadline/--retry-period",
            "RELAY_LEASE_DURATION/RELAY_RENEW_DEADLINE/RELAY_RETRY_PERIOD",
            why,
        ));
    }
    let instance = args.instance_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".into());
        format!("{host}-{}", std::process::id())
    });
    let shutdown = shutdown_signal();
    let health = Arc::new(if args.standby_ready {
        Health::standby_ready()
    } else {
        Health::default()
    });
    let metrics = Arc::new(Metrics::new());
    let addr = crate::http::serve(
        args.http_addr,
        crate::http::Surfaces {
            health: health.clone(),
            metrics: metrics.clone(),
        },
        shutdown.clone(),
    )
    .await
    .map_err(|e| config_error("--http-addr", "RELAY_HTTP_ADDR", e))?;
    tracing::info!(instance = %instance, "outbox-relay serving /healthz /readyz /metrics on http://{addr}");

    let session_opts = opts.clone().options([(
        "idle_in_transaction_session_timeout",
        format!(
            "{}ms",
            idle_in_transaction_timeout(kafka.delivery_timeout).as_millis()
        ),
    )]);
    // One connection per batch in flight, plus the claim overlapping a commit, the NOTIFY listener, the
    // monitors and the coordinator.
    let pool = PgPoolOptions::new()
        .max_connections(u32::from(args.in_flight_batches) + 4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(session_opts.clone());
    if !wait_for_database(&session_opts, &shutdown).await {
        return Ok(());
    }
    if args.migrate {
        outbox::migrate(&pool, schema.as_str()).await?;
        if args.notify {
            outbox::install_notify_trigger(&pool, &schema).await?;
        }
    }
    let producer = Producer::new(kafka, health.clone())
        .map_err(|e| config_error("--kafka-config", "RELAY_KAFKA_CONFIG", e))?;
    if !wait_for_broker(&producer, &shutdown).await {
        return Ok(());
    }
    let cfg = RelayConfig {
        schema: schema.clone(),
        batch_size: args.batch_size,
        poll_interval: args.poll_interval,
        notify: args.notify,
        retry: RetryPolicy {
            max_attempts: args.max_attempts,
            backoff_base: args.backoff_base,
            backoff_max: args.backoff_max,
            poison: args.poison,
        },
        dlq: args.dlq,
        retention: match args.retention {
            RetentionMode::Delete => Retention::Delete,
            RetentionMode::Archive => Retention::Archive {
                ttl_days: args.archive_ttl_days,
            },
        },
        fence_scope: args.fence_scope.clone(),
        max_message_bytes: args.kafka.max_message_bytes,
        in_flight_batches: args.in_flight_batches.into(),
    };
    let relay = Arc::new(Relay::new(
        cfg,
        pool.clone(),
        producer,
        metrics.clone(),
        health.clone(),
    ));
    relay.spawn_monitors(shutdown.clone());
    let mut coordinator: Box<dyn Coordinator> = match args.coordination {
        Coordination::Single => Box::new(
            SingleLock::new(
                opts,
                pool,
                relay.store().clone(),
                args.fence_scope,
                instance,
                health,
            )
            .with_retry(args.lock_retry),
        ),
        Coordination::Competing => Box::new(Competing),
        Coordination::Lease => {
            let (client, namespace) = kube_client(args.lease_namespace.clone()).await?;
            let client_lease = LeaseClient::new(
                client.clone(),
                &namespace,
                args.lease_name.clone(),
                instance.clone(),
                timings,
            );
            if let Some(name) = args.status_resource.clone() {
                crate::status::spawn_reporter(
                    client,
                    &namespace,
                    name,
                    metrics.clone(),
                    shutdown.clone(),
                );
            }
            Box::new(LeaseCoordinator::new(
                client_lease,
                pool,
                relay.store().clone(),
                args.fence_scope,
                health,
                metrics.clone(),
            ))
        }
    };
    relay.run(coordinator.as_mut(), shutdown).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// A client from the in-cluster service account or the kubeconfig, and the namespace to use.
pub(super) async fn kube_client(
    namespace: Option<String>,
) -> anyhow::Result<(kube::Client, String)> {
    // Two TLS backends are linked (sqlx's and kube's); rustls needs the process-wide choice made once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::infer().await.map_err(|e| {
        config_error(
            "--coordination lease",
            "KUBECONFIG",
            format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}"),
        )
    })?;
    let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("create the Kubernetes client")?;
    Ok((client, namespace))
}
