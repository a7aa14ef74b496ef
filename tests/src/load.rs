//! Posting orders to the demo API, concurrently, optionally with a progress bar.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// The demo customers (order keys) orders cycle through.
const CUSTOMERS: usize = 97;

/// Posts `n` orders to `api` with `concurrency` requests in flight, each customer's one after another.
/// Returns the order ids, in posting order.
pub async fn post_orders(
    api: &str,
    n: usize,
    concurrency: usize,
    progress: bool,
) -> anyhow::Result<Vec<String>> {
    let http = reqwest::Client::new();
    let bar = if progress {
        let b = ProgressBar::new(n as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{msg:>14} [{bar:40}] {pos}/{len} orders ({per_sec}, {eta} left)",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_message("posting");
        b
    } else {
        ProgressBar::hidden()
    };
    let failed = Arc::new(AtomicU64::new(0));
    let post = |i: usize| {
        let http = http.clone();
        let bar = bar.clone();
        let failed = failed.clone();
        async move {
            let body = json!({
                "customer": format!("customer-{}", i % CUSTOMERS),
                "items": [{"sku": format!("sku-{}", i % 13), "quantity": 1 + (i % 3)}],
            });
            let r = http.post(format!("{api}/orders")).json(&body).send().await;
            bar.inc(1);
            match r {
                Ok(r) if r.status().as_u16() == 201 => {
                    let v: serde_json::Value = r.json().await.ok()?;
                    v["order"]["id"].as_str().map(str::to_owned)
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        }
    };
    // One worker per group of customers, each posting its customers' orders one after another: a key's
    // writers are serialised, as the README asks of applications ("Concurrent writers"), so its commit
    // order is its id order and the topic can be checked against it.
    let workers = (0..concurrency.max(1)).map(|w| {
        let post = &post;
        async move {
            let mut out = Vec::new();
            for i in (0..n).filter(|i| (i % CUSTOMERS) % concurrency.max(1) == w) {
                out.push((i, post(i).await));
            }
            out
        }
    });
    let mut results: Vec<(usize, Option<String>)> = futures::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    results.sort_by_key(|(i, _)| *i);
    let results: Vec<Option<String>> = results.into_iter().map(|(_, id)| id).collect();
    bar.finish_and_clear();
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {n} orders were not accepted");
    }
    Ok(results.into_iter().flatten().collect())
}
