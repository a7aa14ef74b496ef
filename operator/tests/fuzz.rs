//! Fuzzing custom resource validation: every example resource, mutated field by field (strings replaced by
//! odd text, numbers by out-of-range values, booleans flipped, list items dropped or repeated, keys removed)
//! and read back as the typed resource the API server would hand the operator. Planning never panics:
//! it returns the children, whose manifests serialize, or a `SpecError` naming a `spec.` field. Budget and
//! replay: see `test_support::fuzz`.

use operator::crd::{ConsumerGroup, OutboxRelay};
use operator::plan::{desired_consumer, desired_relay, Defaults};
use proptest::prelude::*;
use serde_json::Value;
use test_support::fuzz::fuzz;

/// One mutation: which node (index into a walk of the tree, modulo its size) and what happens to it.
#[derive(Debug, Clone)]
enum Mutation {
    Text(usize, String),
    Number(usize, i64),
    Flip(usize),
    Drop(usize),
    Repeat(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let text = prop_oneof![
        any::<String>(),
        Just(String::new()),
        "[a-z0-9.-]{60,70}",
        "[ -~]{0,12}",
        Just("0".to_owned()),
        Just("-1s".to_owned()),
        Just("9999999999".to_owned()),
    ];
    let number = prop_oneof![
        Just(0i64),
        Just(-1),
        Just(i64::from(i32::MAX) + 1),
        any::<i64>(),
        0i64..100
    ];
    prop_oneof![
        (any::<usize>(), text).prop_map(|(i, s)| Mutation::Text(i, s)),
        (any::<usize>(), number).prop_map(|(i, n)| Mutation::Number(i, n)),
        any::<usize>().prop_map(Mutation::Flip),
        any::<usize>().prop_map(Mutation::Drop),
        any::<usize>().prop_map(Mutation::Repeat),
    ]
}

/// Paths (JSON pointers) of every node under `spec`.
fn nodes(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                nodes(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                )
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                nodes(c, format!("{at}/{i}"), out)
            }
        }
        _ => {}
    }
}

fn apply(doc: &mut Value, m: &Mutation) {
    let mut paths = Vec::new();
    nodes(&doc["spec"], "/spec".into(), &mut paths);
    let pick = |i: usize| paths[i % paths.len()].clone();
    match m {
        Mutation::Text(i, s) => {
            if let Some(Value::String(t)) = doc.pointer_mut(&pick(*i)) {
                *t = s.clone();
            }
        }
        Mutation::Number(i, n) => {
            if let Some(v @ Value::Number(_)) = doc.pointer_mut(&pick(*i)) {
                *v = Value::from(*n);
            }
        }
        Mutation::Flip(i) => {
            if let Some(Value::Bool(b)) = doc.pointer_mut(&pick(*i)) {
                *b = !*b;
            }
        }
        Mutation::Drop(i) | Mutation::Repeat(i) => {
            let path = pick(*i);
            let Some((parent, last)) = path.rsplit_once('/') else {
                return;
            };
            if parent.is_empty() {
                return;
            }
            match doc.pointer_mut(parent) {
                Some(Value::Object(o)) if matches!(m, Mutation::Drop(_)) => {
                    o.remove(&last.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(a)) => {
                    let Ok(k) = last.parse::<usize>() else { return };
                    if matches!(m, Mutation::Drop(_)) {
                        a.remove(k);
                    } else {
                        let copy = a[k].clone();
                        a.insert(k, copy);
                    }
                }
                _ => {}
            }
        }
    }
}

#[test]
fn mutated_custom_resources_plan_or_name_the_field_at_fault() {
    let examples = contract::fixtures::examples();
    let defaults = Defaults {
        relay_image: "ghcr.io/outbox-operator/outbox-relay:0.1.0".into(),
    };
    let input = (
        0..examples.len(),
        proptest::collection::vec(mutation(), 1..5),
    );
    fuzz("custom resource specs", input, |(which, mutations)| {
        let mut doc = examples[which].clone();
        for m in &mutations {
            apply(&mut doc, m);
        }
        doc["metadata"]["namespace"] = "default".into();
        doc["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001".into();
        let planned = match doc["kind"].as_str() {
            Some("OutboxRelay") => match serde_json::from_value::<OutboxRelay>(doc.clone()) {
                // A type the schema refuses never reaches the operator.
                Err(_) => return Ok(()),
                Ok(cr) => {
                    desired_relay(&cr, &defaults).map(|c| serde_json::to_value(&c.deployment))
                }
            },
            Some("ConsumerGroup") => match serde_json::from_value::<ConsumerGroup>(doc.clone()) {
                Err(_) => return Ok(()),
                Ok(cr) => {
                    let replicas = cr.spec.replicas;
                    desired_consumer(&cr, replicas).map(|c| serde_json::to_value(&c.deployment))
                }
            },
            other => panic!("example of kind {other:?}"),
        };
        match planned {
            Ok(deployment) => {
                let d = deployment.unwrap();
                prop_assert!(d["spec"]["template"]["spec"]["containers"].is_array());
            }
            Err(e) => {
                prop_assert!(e.field.starts_with("spec."), "{:?}", e);
                prop_assert!(!e.reason.is_empty());
            }
        }
        Ok(())
    });
}
