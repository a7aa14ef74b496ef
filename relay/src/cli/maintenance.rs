//! `outbox-relay replay` and `outbox-relay dead`: the maintenance subcommands.

use super::*;

pub(super) async fn replay(
    args: ReplayArgs,
    opts: PgConnectOptions,
    schema: SchemaName,
) -> anyhow::Result<()> {
    let kafka = kafka_settings(&args.kafka)?;
    let filter = ReplayFilter {
        since: args.since,
        until: args.until.unwrap_or_else(Utc::now),
        key: args.key,
        topic: args.topic,
    };
    if filter.since >= filter.until {
        return Err(config_error("--since", "-", "must be before --until"));
    }
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await
        .context("connect to the database")?;
    let total = tools::replay_count(&pool, &schema, &filter).await?;
    if args.dry_run {
        println!("dry run: {total} archived events match; nothing produced");
        return Ok(());
    }
    let producer = Producer::new(kafka, Arc::new(Health::default()))
        .map_err(|e| config_error("--kafka-config", "RELAY_KAFKA_CONFIG", e))?;
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .expect("static template"),
    );
    let report = tools::replay(
        &pool,
        &schema,
        &filter,
        args.to_topic.as_deref(),
        &producer,
        |n| bar.set_position(n),
    )
    .await?;
    bar.finish();
    println!("replayed {} events, {} failed", report.sent, report.failed);
    if report.failed > 0 {
        anyhow::bail!("{} events could not be replayed", report.failed);
    }
    Ok(())
}

pub(super) async fn dead(
    cmd: DeadCommand,
    opts: PgConnectOptions,
    schema: SchemaName,
) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .context("connect to the database")?;
    match cmd {
        DeadCommand::List { sel, limit, json } => {
            let rows = tools::dead_list(&pool, &schema, &sel.to_selector(), limit).await?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                println!(
                    "{:<36}  {:<20}  {:<16}  {:<13}  {:>8}  {:<6}  error",
                    "event_id", "topic", "key", "reason", "attempts", "parked"
                );
                for r in &rows {
                    let err: String = r.error.chars().take(80).collect();
                    println!(
                        "{:<36}  {:<20}  {:<16}  {:<13}  {:>8}  {:<6}  {err}",
                        r.event_id, r.topic, r.key, r.reason, r.attempts, r.parked
                    );
                }
            }
        }
        DeadCommand::Redrive { sel, all } | DeadCommand::Discard { sel, all }
            if sel.is_empty() && !all =>
        {
            return Err(config_error(
                "--event-id/--key/--topic",
                "-",
                "name the events, or pass --all",
            ));
        }
        DeadCommand::Redrive { sel, .. } => {
            let n = tools::dead_redrive(&pool, &schema, &sel.to_selector()).await?;
            println!("redrove {n} events");
        }
        DeadCommand::Discard { sel, .. } => {
            let n = tools::dead_discard(&pool, &schema, &sel.to_selector()).await?;
            println!("discarded {n} events");
        }
    }
    Ok(())
}
