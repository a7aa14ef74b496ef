//! Watches for the fake API server. kube-fake-client answers a watch request like a list, so a controller's
//! watcher would fail and fall back to re-listing with backoff. Here a watch is served as a real API server
//! streams it — one JSON `WatchEvent` per line — by listing the store every [`POLL`] and sending what
//! changed. Known gap: an object deleted between the client's list and its watch is not reported (the
//! store keeps no history to replay); every later change is.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::Uri;
use axum::response::Response;
use serde_json::{json, Value};

/// How often a watch lists the store, at the most. A watch waits [`POLL_SHARE`] times as long as its last
/// list took before listing again, so that many watches over a big store leave the writes room.
pub const POLL: Duration = Duration::from_millis(100);

/// A watch's lists may take at most one part in this many of its time.
const POLL_SHARE: u32 = 20;

/// Query keys of a watch that a list must not see.
const WATCH_ONLY_KEYS: [&str; 6] = [
    "watch",
    "resourceVersion",
    "resourceVersionMatch",
    "timeoutSeconds",
    "allowWatchBookmarks",
    "sendInitialEvents",
];

/// A watch request: what to list, from which resourceVersion on, for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRequest {
    /// The same request as a list (selectors kept, watch parameters dropped).
    pub list_uri: Uri,
    /// Objects at or below this resourceVersion are known to the client already.
    pub since: u64,
    /// The server ends the stream after this long (the client then watches again).
    pub timeout: Duration,
}

/// `Some` when `uri` asks for a watch (`watch=true` or `watch=1`). kube-fake-client counts resourceVersions
/// with one counter for the whole store, so "newer than the client's" is a numeric comparison.
pub fn watch_request(uri: &Uri) -> Option<WatchRequest> {
    let query = uri.query()?;
    let pairs: Vec<(&str, &str)> = query
        .split('&')
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let value = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    if !matches!(value("watch"), Some("true" | "1")) {
        return None;
    }
    let kept: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| !WATCH_ONLY_KEYS.contains(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let path = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    Some(WatchRequest {
        list_uri: path.parse().ok()?,
        since: value("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        timeout: Duration::from_secs(
            value("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(300),
        ),
    })
}

/// The objects a watch has told its client about: `namespace/name` → (resourceVersion, object).
#[derive(Debug, Default)]
pub struct Known(BTreeMap<String, (u64, Value)>);

impl Known {
    /// Compares a fresh list with what the client knows and returns the events that bring it up to date.
    /// On the first list (`since` set), objects the client listed itself are recorded without an event.
    pub fn update(&mut self, items: Vec<Value>, since: Option<u64>) -> Vec<Value> {
        let mut events = Vec::new();
        let mut present = HashSet::new();
        for obj in items {
            let key = format!(
                "{}/{}",
                obj["metadata"]["namespace"].as_str().unwrap_or(""),
                obj["metadata"]["name"].as_str().unwrap_or("")
            );
            let rv: u64 = obj["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let kind = match self.0.get(&key) {
                None if since.is_some_and(|s| rv <= s) => None,
                None => Some("ADDED"),
                Some((old, _)) if *old != rv => Some("MODIFIED"),
                Some(_) => None,
            };
            if let Some(kind) = kind {
                events.push(json!({"type": kind, "object": obj}));
            }
            present.insert(key.clone());
            self.0.insert(key, (rv, obj));
        }
        let gone: Vec<String> = self
            .0
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let (_, obj) = self.0.remove(&key).expect("key listed above");
            events.push(json!({"type": "DELETED", "object": obj}));
        }
        events
    }
}

/// Streams the changes of `req` until its timeout, the client hanging up, or a failed list.
/// The first list's error (e.g. 404 for an unknown kind) is returned as the response itself.
pub async fn serve(client: kube::Client, req: WatchRequest) -> Result<Response, Response> {
    let first = list(&client, &req.list_uri).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + req.timeout;
        let mut known = Known::default();
        let mut items = first;
        let mut since = Some(req.since);
        let mut list_took = Duration::ZERO;
        loop {
            for event in known.update(items, since.take()) {
                if tx.send(Bytes::from(format!("{event}\n"))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL.max(list_took * POLL_SHARE)) => {}
                _ = tx.closed() => return,
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            let listing = tokio::time::Instant::now();
            let listed = list(&client, &req.list_uri).await;
            list_took = listing.elapsed();
            items = match listed {
                Ok(items) => items,
                Err(_) => return,
            };
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// The items of a list through the fake client; an API error becomes the response to return.
async fn list(client: &kube::Client, uri: &Uri) -> Result<Vec<Value>, Response> {
    let req = axum::http::Request::get(uri.clone())
        .body(Vec::new())
        .expect("a GET with a parsed URI");
    match client.request::<Value>(req).await {
        Ok(mut list) => Ok(match list["items"].take() {
            Value::Array(items) => items,
            _ => Vec::new(),
        }),
        Err(e) => Err(super::error_response(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, rv: u64) -> Value {
        json!({"metadata": {"namespace": "ns", "name": name, "resourceVersion": rv.to_string()}})
    }

    fn types(events: &[Value]) -> Vec<(String, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_string(),
                    e["object"]["metadata"]["name"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn a_watch_request_keeps_selectors_and_drops_watch_parameters() {
        let uri: Uri = "/api/v1/namespaces/ns/pods?allowWatchBookmarks=true&labelSelector=app%3Dx\
                        &resourceVersion=42&timeoutSeconds=290&watch=true"
            .parse()
            .unwrap();
        let w = watch_request(&uri).unwrap();
        assert_eq!(
            w.list_uri,
            "/api/v1/namespaces/ns/pods?labelSelector=app%3Dx"
        );
        assert_eq!(w.since, 42);
        assert_eq!(w.timeout, Duration::from_secs(290));
        let list: Uri = "/api/v1/pods?labelSelector=a".parse().unwrap();
        assert_eq!(watch_request(&list), None);
        let off: Uri = "/api/v1/pods?watch=false".parse().unwrap();
        assert_eq!(watch_request(&off), None);
    }

    #[test]
    fn changes_become_added_modified_and_deleted_events() {
        let mut known = Known::default();
        // The client listed a@3 itself; b@7 came after its list.
        let first = known.update(vec![obj("a", 3), obj("b", 7)], Some(5));
        assert_eq!(types(&first), [("ADDED".into(), "b".into())]);
        assert!(known
            .update(vec![obj("a", 3), obj("b", 7)], None)
            .is_empty());
        let next = known.update(vec![obj("b", 9), obj("c", 10)], None);
        assert_eq!(
            types(&next),
            [
                ("MODIFIED".into(), "b".into()),
                ("ADDED".into(), "c".into()),
                ("DELETED".into(), "a".into())
            ]
        );
        assert_eq!(next[2]["object"]["metadata"]["resourceVersion"], "3");
    }

    /// A kube client over HTTP watches the served store: it sees what another client creates, changes and
    /// deletes, in order, and a bad path still gets the API server's 404.
    #[tokio::test]
    async fn a_client_over_http_receives_the_changes() {
        use futures::StreamExt;
        use k8s_openapi::api::core::v1::ConfigMap;
        use kube::api::{Api, DeleteParams, PostParams, WatchParams};

        // kube's TLS stack wants one crypto provider chosen, even for plain HTTP (as in the binaries).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = kube_fake_client::ClientBuilder::new()
            .build()
            .await
            .unwrap();
        let server = super::super::FakeApiServer::start(store.clone())
            .await
            .unwrap();
        let config = kube::Config::new(server.url().parse().unwrap());
        let remote: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(config).unwrap(), "ns");
        let local: Api<ConfigMap> = Api::namespaced(store, "ns");

        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
        local.create(&PostParams::default(), &cm).await.unwrap();
        let listed = remote.list(&Default::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        let since = listed.items[0].metadata.resource_version.clone().unwrap();
        let mut events = remote
            .watch(&WatchParams::default().timeout(30), &since)
            .await
            .unwrap()
            .boxed();

        let mut changed = listed.items[0].clone();
        changed.data = Some([("k".to_string(), "v".to_string())].into());
        local
            .replace("a", &PostParams::default(), &changed)
            .await
            .unwrap();
        assert_eq!(
            next(&mut events).await,
            "MODIFIED a",
            "the listed object is not re-sent as ADDED"
        );
        let b: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "b"}})).unwrap();
        local.create(&PostParams::default(), &b).await.unwrap();
        assert_eq!(next(&mut events).await, "ADDED b");
        local.delete("a", &DeleteParams::default()).await.unwrap();
        assert_eq!(next(&mut events).await, "DELETED a");

        assert_eq!(
            status_of(server.url(), "/apis/nope.dev/v1/things?watch=true").await,
            404
        );
    }

    /// The next watch event as `TYPE name`.
    async fn next(
        events: &mut futures::stream::BoxStream<
            'static,
            kube::Result<kube::api::WatchEvent<k8s_openapi::api::core::v1::ConfigMap>>,
        >,
    ) -> String {
        use futures::TryStreamExt;
        use kube::api::WatchEvent;
        let event = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .expect("the stream stays open");
        match event {
            WatchEvent::Added(o) => format!("ADDED {}", o.metadata.name.unwrap()),
            WatchEvent::Modified(o) => format!("MODIFIED {}", o.metadata.name.unwrap()),
            WatchEvent::Deleted(o) => format!("DELETED {}", o.metadata.name.unwrap()),
            other => format!("{other:?}"),
        }
    }

    /// The status code of a GET, through a plain kube client.
    async fn status_of(url: &str, path: &str) -> u16 {
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let req = axum::http::Request::get(path).body(Vec::new()).unwrap();
        match client.request_text(req).await {
            Ok(_) => 200,
            Err(kube::Error::Api(s)) => s.code,
            Err(e) => panic!("{e}"),
        }
    }
}
