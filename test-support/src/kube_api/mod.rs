//! A Kubernetes API server for tests: kube-fake-client's in-memory store (resourceVersion conflicts,
//! status subresource, server-side apply) served over HTTP on a loopback port, so that separate processes
//! — relays killed with SIGKILL — share one Lease — and a controller's watches receive events ([`watch`]).
//! No API server runs on the machines this project tests on.

pub mod watch;

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http_body_util::BodyExt;

/// A running fake API server.
pub struct FakeApiServer {
    url: String,
    client: kube::Client,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    /// Serves `client` (built with `kube_fake_client::ClientBuilder`) on a free loopback port.
    pub async fn start(client: kube::Client) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(client.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n\
                 \x20   user: fake\n    namespace: default\ncurrent-context: fake\n"
            ),
        )?;
        Ok(Self {
            url,
            client,
            _dir: dir,
            kubeconfig,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig file pointing at this server (namespace `default`), for `KUBECONFIG`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The in-process client over the same store.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(client): State<kube::Client>, req: Request) -> Response {
    if let Some(w) = watch::watch_request(req.uri()) {
        return watch::serve(client, w).await.unwrap_or_else(|e| e);
    }
    let (parts, body) = req.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) => return status(400, e.to_string()),
    };
    let req = axum::http::Request::from_parts(parts, kube::client::Body::from(bytes));
    match client.send(req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            match body.collect().await {
                Ok(b) => Response::from_parts(parts, Body::from(b.to_bytes())),
                Err(e) => status(500, e.to_string()),
            }
        }
        Err(e) => error_response(e),
    }
}

/// An API error as the `Status` object a real API server sends; other errors as a plain 500.
fn error_response(e: kube::Error) -> Response {
    let kube::Error::Api(s) = e else {
        return status(500, e.to_string());
    };
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": s.message, "reason": s.reason, "code": s.code,
    });
    status(s.code, body.to_string())
}

fn status(code: u16, message: String) -> Response {
    let mut r = Response::new(Body::from(message));
    *r.status_mut() = axum::http::StatusCode::from_u16(code)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    r
}
