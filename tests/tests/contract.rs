//! The contract between the operator and the processes it runs is environment variables: the operator
//! renders them into Deployments, the relay's and the consumer runtime's clap definitions read them. A
//! renamed variable on either side would compile and silently fall back to a default in deployed pods, so
//! this test renders the operator's Deployments — for every example in `examples/` and for resources that
//! set every field away from its default — and feeds their environment to the processes' own parsers:
//! every variable must be one the process declares, and the settings must parse to what the spec asked.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::EnvVar;
use operator::crd::{ConsumerGroup, OutboxRelay};
use operator::plan::{desired_consumer, desired_relay, Defaults};
use serde_json::json;

/// The consumer runtime's settings as a consumer binary embeds them.
#[derive(Debug, Parser)]
struct Consumer {
    #[command(flatten)]
    args: consumer_runtime::cli::ConsumerArgs,
}

/// Every environment variable a clap command (and its subcommands) reads.
fn declared(cmd: &clap::Command) -> Vec<String> {
    let mut names: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for sub in cmd.get_subcommands() {
        names.extend(declared(sub));
    }
    names
}

/// The first container's environment with Kubernetes' references resolved as the kubelet would (the
/// values only need to be well-formed).
fn container_env(d: &Deployment) -> (BTreeMap<String, String>, Vec<String>) {
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let env: BTreeMap<String, String> = c
        .env
        .iter()
        .flatten()
        .map(
            |EnvVar {
                 name,
                 value,
                 value_from,
             }| {
                let value = match (value, value_from) {
                    (Some(v), _) => v.clone(),
                    (None, Some(from)) if from.secret_key_ref.is_some() => {
                        "postgres://outbox@db.example/shop".into()
                    }
                    (None, Some(from)) if from.field_ref.is_some() => "pod-0".into(),
                    other => panic!("{name}: unexpected env source {other:?}"),
                };
                (name.clone(), value)
            },
        )
        .collect();
    (env, c.args.clone().unwrap_or_default())
}

/// Parses `args` with exactly `env` as the process environment (a lock serialises the tests that set it).
/// The command is built inside: clap reads an argument's variable when the command is built.
fn parse_with_env(
    cmd: fn() -> clap::Command,
    program: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> clap::ArgMatches {
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let saved: Vec<(String, String)> = std::env::vars().collect();
    for (k, _) in &saved {
        std::env::remove_var(k);
    }
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let argv = std::iter::once(program.to_owned()).chain(args.iter().cloned());
    let parsed = cmd().try_get_matches_from(argv);
    for k in env.keys() {
        std::env::remove_var(k);
    }
    for (k, v) in saved {
        std::env::set_var(k, v);
    }
    parsed.unwrap_or_else(|e| panic!("{program} refused the operator's environment {env:?}: {e}"))
}

fn relay_matches(cr: &OutboxRelay) -> clap::ArgMatches {
    let defaults = Defaults {
        relay_image: "relay:test".into(),
    };
    let children = desired_relay(cr, &defaults).expect("plan");
    let (env, args) = container_env(&children.deployment);
    let known = declared(&relay::cli::Cli::command());
    for name in env.keys() {
        assert!(
            known.contains(name),
            "the operator sets {name} on the relay, which does not read it (declared: {known:?})"
        );
    }
    let matches = parse_with_env(relay::cli::Cli::command, "outbox-relay", &args, &env);
    let (sub, run) = matches.subcommand().expect("a subcommand");
    assert_eq!(sub, "run");
    run.clone()
}

fn consumer_matches(cr: &ConsumerGroup) -> clap::ArgMatches {
    let children = desired_consumer(cr, cr.spec.replicas).expect("plan");
    let (mut env, args) = container_env(&children.deployment);
    // The user's own variables (spec.env) are for the user's binary, not part of the contract.
    for user in &cr.spec.env {
        env.remove(&user.name);
    }
    let known = declared(&Consumer::command());
    for name in env.keys() {
        assert!(
            known.contains(name),
            "the operator sets {name} on consumers, which do not read it (declared: {known:?})"
        );
    }
    parse_with_env(Consumer::command, "consumer", &args, &env)
}

/// The examples as the operator sees them once applied (namespace and uid set).
fn load_examples() -> Vec<serde_json::Value> {
    contract::fixtures::examples()
        .into_iter()
        .map(|mut v| {
            v["metadata"]["namespace"] = json!("default");
            v["metadata"]["uid"] = json!("00000000-0000-0000-0000-000000000001");
            v
        })
        .collect()
}

#[test]
fn every_example_renders_an_environment_its_process_reads() {
    let mut seen = (0, 0);
    for v in load_examples() {
        match v["kind"].as_str() {
            Some("OutboxRelay") => {
                let cr: OutboxRelay = serde_json::from_value(v).unwrap();
                let run = relay_matches(&cr);
                assert_eq!(
                    run.get_one::<String>("brokers"),
                    Some(&cr.spec.kafka.bootstrap)
                );
                assert_eq!(
                    run.get_one::<i64>("batch_size").copied(),
                    Some(i64::from(cr.spec.batch_size))
                );
                seen.0 += 1;
            }
            Some("ConsumerGroup") => {
                let cr: ConsumerGroup = serde_json::from_value(v).unwrap();
                let m = consumer_matches(&cr);
                assert_eq!(m.get_one::<String>("group_id"), Some(&cr.spec.group_id));
                assert_eq!(
                    m.get_one::<String>("brokers"),
                    Some(&cr.spec.kafka.bootstrap)
                );
                seen.1 += 1;
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }
    assert!(seen.0 >= 2 && seen.1 >= 3, "examples seen: {seen:?}");
}

#[test]
fn every_relay_setting_away_from_its_default_reaches_the_relay() {
    let cr: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
        "metadata": {"name": "shop", "namespace": "default", "uid": "00000000-0000-0000-0000-000000000003"},
        "spec": {
            "database": {"secretRef": {"name": "db", "key": "url"}, "schema": "events"},
            "kafka": {"bootstrap": "k1:9092,k2:9092"},
            "coordination": {"mode": "Lease", "leaseDurationSeconds": 20, "renewDeadlineSeconds": 12, "retryPeriodSeconds": 3},
            "batchSize": 321, "inFlightBatches": 3, "pollIntervalMs": 750, "maxAttempts": 4,
            "poison": "Skip", "dlq": true, "retention": "Archive"
        }
    }))
    .unwrap();
    let run = relay_matches(&cr);
    assert_eq!(run.get_one::<String>("brokers").unwrap(), "k1:9092,k2:9092");
    assert_eq!(run.get_one::<i64>("batch_size"), Some(&321));
    assert_eq!(run.get_one::<u16>("in_flight_batches"), Some(&3));
    assert_eq!(
        run.get_one::<Duration>("poll_interval"),
        Some(&Duration::from_millis(750))
    );
    assert_eq!(run.get_one::<i32>("max_attempts"), Some(&4));
    assert_eq!(
        run.get_one::<relay::decide::PoisonPolicy>("poison"),
        Some(&relay::decide::PoisonPolicy::Skip)
    );
    assert_eq!(run.get_one::<bool>("dlq"), Some(&true));
    assert_eq!(
        run.get_raw("retention")
            .and_then(|mut v| v.next())
            .map(|v| v.to_string_lossy().into_owned())
            .as_deref(),
        Some("archive")
    );
    assert_eq!(
        run.get_one::<relay::cli::Coordination>("coordination"),
        Some(&relay::cli::Coordination::Lease)
    );
    assert_eq!(
        run.get_one::<Duration>("lease_duration"),
        Some(&Duration::from_secs(20))
    );
    assert_eq!(
        run.get_one::<Duration>("renew_deadline"),
        Some(&Duration::from_secs(12))
    );
    assert_eq!(
        run.get_one::<Duration>("retry_period"),
        Some(&Duration::from_secs(3))
    );
    assert_eq!(run.get_one::<String>("lease_name").unwrap(), "shop-relay");
    assert_eq!(run.get_one::<String>("fence_scope").unwrap(), "shop");
    assert_eq!(run.get_one::<String>("status_resource").unwrap(), "shop");
    assert_eq!(run.get_one::<bool>("standby_ready"), Some(&true));
    assert_eq!(run.get_one::<String>("schema").unwrap(), "events");
}
