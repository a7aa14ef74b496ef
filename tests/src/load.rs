//! Posting orders to the demo API, concurrently, optionally with a progress bar.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::bail;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Posts `n` orders to `api` with `concurrency` requests in flight. Returns the order ids.
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
    let results: Vec<Option<String>> = futures::stream::iter(0..n)
        .map(|i| {
            let http = http.clone();
            let bar = bar.clone();
            let failed = failed.clone();
            async move {
                let body = json!({
                    "customer": format!("customer-{}", i % 97),
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
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    bar.finish_and_clear();
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {n} orders were not accepted");
    }
    Ok(results.into_iter().flatten().collect())
}
