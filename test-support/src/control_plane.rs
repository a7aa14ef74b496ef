//! A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager started on
//! free loopback ports, with certificates generated at start (like controller-runtime's envtest, plus the
//! controller-manager for Deployments → ReplicaSets → Pods, garbage collection, namespaces and tokens).
//!
//! There is no scheduler and no kubelet: Pods are created and stay `Pending` unless a test writes their
//! status ([`mark_pods_ready`]). Binaries come from `$KUBEBUILDER_ASSETS` (the envtest convention) or the
//! cache that `scripts/setup.sh` fills ([`binaries_dir`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

/// The Kubernetes version the project tests against (the bundle `scripts/setup.sh` unpacks).
pub const KUBERNETES_VERSION: &str = "1.36.2";

/// Directory holding `etcd`, `kube-apiserver` and `kube-controller-manager`: `$KUBEBUILDER_ASSETS` when it
/// holds all three, else `$OUTBOX_CACHE` (default `~/.cache/outbox-operator`)`/k8s-v1.36.2`.
pub fn binaries_dir() -> anyhow::Result<PathBuf> {
    let complete = |d: &Path| {
        ["etcd", "kube-apiserver", "kube-controller-manager"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from) {
        if complete(&dir) {
            return Ok(dir);
        }
    }
    let dir = crate::cache_dir().join(format!("k8s-v{KUBERNETES_VERSION}"));
    if complete(&dir) {
        return Ok(dir);
    }
    bail!(
        "no Kubernetes control plane binaries in {} (nor in $KUBEBUILDER_ASSETS): run `make setup`, or set \
         KUBEBUILDER_ASSETS to a directory holding etcd, kube-apiserver and kube-controller-manager v{KUBERNETES_VERSION}",
        dir.display()
    )
}

/// A running control plane owned by this process.
pub struct ControlPlane {
    url: String,
    dir: tempfile::TempDir,
    children: Mutex<Vec<(&'static str, Child)>>,
    started_in: Duration,
}

/// A ServiceAccount's credentials, from the TokenRequest API.
pub struct ServiceAccountAccess {
    /// Bearer token.
    pub token: String,
    /// A kubeconfig file using the token (namespace set to the ServiceAccount's), for child processes.
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager; returns when the API server is ready and the
    /// controller-manager has created the `default` ServiceAccount (its controllers run).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_crds(&[])
    }

    /// [`ControlPlane::start`] with CustomResourceDefinitions (YAML) installed before the controller-manager
    /// starts: its garbage collector then watches their resources from the beginning, instead of finding a
    /// CRD that appears later at its next discovery (every 30 s, as on any cluster).
    pub fn start_with_crds(crds: &[String]) -> anyhow::Result<Self> {
        let started = Instant::now();
        let bin = binaries_dir()?;
        let dir = tempfile::Builder::new().prefix("outbox-k8s-").tempdir()?;
        let pki = Pki::generate()?;
        pki.write(dir.path())?;
        let mut plane = Self {
            url: String::new(),
            dir,
            children: Mutex::new(Vec::new()),
            started_in: Duration::ZERO,
        };
        let d = plane.dir.path().to_path_buf();
        let p = |name: &str| d.join(name).display().to_string();

        let etcd_port = crate::free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.arg("--data-dir")
            .arg(d.join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", crate::free_port()),
            ]);
        if etcd_is_upstream(&bin.join("etcd")) {
            // Upstream etcd refuses listen URLs without advertised ones; the bundle's mini-etcd has neither flag.
            etcd.args(["--advertise-client-urls", &etcd_url]);
            etcd.args(["--unsafe-no-fsync"]);
        }
        plane.spawn("etcd", etcd)?;
        plane.wait("etcd", Duration::from_secs(30), || {
            http_get_plain(etcd_port, "/health").is_some_and(|b| b.contains("true"))
        })?;

        let port = crate::free_port();
        plane.url = format!("https://127.0.0.1:{port}");
        let mut apiserver = Command::new(bin.join("kube-apiserver"));
        apiserver.args([
            "--bind-address=127.0.0.1",
            &format!("--secure-port={port}"),
            "--advertise-address=127.0.0.1",
            // Keeps the machine's own address out of the cluster (the `kubernetes` Service has no endpoints).
            "--endpoint-reconciler-type=none",
            &format!("--etcd-servers={etcd_url}"),
            &format!("--client-ca-file={}", p("ca.crt")),
            &format!("--tls-cert-file={}", p("apiserver.crt")),
            &format!("--tls-private-key-file={}", p("apiserver.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            &format!("--service-account-key-file={}", p("sa.pub")),
            &format!("--service-account-signing-key-file={}", p("sa.key")),
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--profiling=false",
            &format!("--cert-dir={}", p("apiserver-certs")),
        ]);
        plane.spawn("kube-apiserver", apiserver)?;
        let admin = plane.kubeconfig();
        plane.wait("kube-apiserver", Duration::from_secs(60), || {
            block_on(async {
                let client = client_from(&admin).await.ok()?;
                let ready = client.request_text(readyz()).await.ok()?;
                (ready == "ok").then_some(())
            })
            .is_some()
        })?;

        for crd in crds {
            block_on(async {
                let client = client_from(&admin).await?;
                install_crd_yaml(&client, crd).await
            })?;
        }

        write_kubeconfig(
            &d.join("controller-manager.kubeconfig"),
            &plane.url,
            &d.join("ca.crt"),
            User::Certificate(
                &d.join("controller-manager.crt"),
                &d.join("controller-manager.key"),
            ),
            "default",
        )?;
        let kcm_config = p("controller-manager.kubeconfig");
        let mut kcm = Command::new(bin.join("kube-controller-manager"));
        kcm.args([
            &format!("--kubeconfig={kcm_config}"),
            &format!("--authentication-kubeconfig={kcm_config}"),
            &format!("--authorization-kubeconfig={kcm_config}"),
            "--bind-address=127.0.0.1",
            &format!("--secure-port={}", crate::free_port()),
            "--use-service-account-credentials=true",
            &format!("--service-account-private-key-file={}", p("sa.key")),
            &format!("--root-ca-file={}", p("ca.crt")),
            &format!("--cluster-signing-cert-file={}", p("ca.crt")),
            &format!("--cluster-signing-key-file={}", p("ca.key")),
            "--controllers=*",
            "--leader-elect=false",
            &format!("--cert-dir={}", p("controller-manager-certs")),
        ]);
        plane.spawn("kube-controller-manager", kcm)?;
        plane.wait("kube-controller-manager", Duration::from_secs(60), || {
            block_on(async {
                let client = client_from(&admin).await.ok()?;
                Api::<ServiceAccount>::namespaced(client, "default")
                    .get_opt("default")
                    .await
                    .ok()?
            })
            .is_some()
        })?;
        plane.started_in = started.elapsed();
        Ok(plane)
    }

    fn spawn(&self, name: &'static str, mut cmd: Command) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log_path(name))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        // etcd goes last (the watchdogs run in parallel), and its watchdog removes the directory.
        let data = (name == "etcd").then(|| self.dir.path());
        crate::reaper::watch(child.id(), "TERM", data);
        self.children.lock().unwrap().push((name, child));
        Ok(())
    }

    fn wait(&self, name: &str, timeout: Duration, ready: impl Fn() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            for (child_name, child) in self.children.lock().unwrap().iter_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{child_name} exited ({status}) while waiting for {name}:\n{}",
                        self.logs()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("{name} not ready within {timeout:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `https://127.0.0.1:PORT` of the API server.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How long [`ControlPlane::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The admin kubeconfig (`system:masters`, namespace `default`), for `KUBECONFIG` of child processes.
    pub fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.path().join("admin.kubeconfig");
        if !path.exists() {
            let d = self.dir.path();
            write_kubeconfig(
                &path,
                &self.url,
                &d.join("ca.crt"),
                User::Certificate(&d.join("admin.crt"), &d.join("admin.key")),
                "default",
            )
            .expect("write the admin kubeconfig");
        }
        path
    }

    /// A new admin client (one per call: a client's connections belong to the runtime that made them, and
    /// every `#[tokio::test]` has its own).
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig())
            .await
            .expect("admin client for the test control plane")
    }

    /// Creates (or reuses) ServiceAccount `namespace/name` and returns a token for it from the TokenRequest
    /// API with a kubeconfig file using it.
    pub async fn service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<ServiceAccountAccess> {
        let api = Api::<ServiceAccount>::namespaced(self.client().await, namespace);
        let sa = ServiceAccount {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.patch(
            name,
            &PatchParams::apply("test-support").force(),
            &Patch::Apply(&sa),
        )
        .await
        .with_context(|| format!("apply ServiceAccount {namespace}/{name}"))?;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let issued: TokenRequest = api
            .create_subresource("token", name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{name}"))?;
        let token = issued.status.context("TokenRequest without status")?.token;
        let kubeconfig = self
            .dir
            .path()
            .join(format!("sa-{namespace}-{name}.kubeconfig"));
        write_kubeconfig(
            &kubeconfig,
            &self.url,
            &self.dir.path().join("ca.crt"),
            User::Token(&token),
            namespace,
        )?;
        Ok(ServiceAccountAccess { token, kubeconfig })
    }

    /// A client authenticated as ServiceAccount `namespace/name` (created if missing).
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<kube::Client> {
        client_from(&self.service_account(namespace, name).await?.kubeconfig).await
    }

    /// A new namespace with a unique name built from `prefix`, so tests sharing the control plane do not
    /// see each other's objects.
    pub async fn namespace(&self, prefix: &str) -> String {
        self.namespace_labelled(prefix, &[]).await
    }

    /// Like [`ControlPlane::namespace`], with labels (e.g. `pod-security.kubernetes.io/enforce`).
    pub async fn namespace_labelled(&self, prefix: &str, labels: &[(&str, &str)]) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client().await)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        name
    }

    /// Runs `kubectl ARGS` with the admin kubeconfig; `None` when kubectl is not on PATH (the machines CI runs
    /// on have it).
    pub fn kubectl(&self, args: &[&str]) -> Option<std::process::Output> {
        let kubectl = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("kubectl"))
            .find(|p| p.is_file())?;
        Some(
            Command::new(kubectl)
                .args(args)
                .env("KUBECONFIG", self.kubeconfig())
                .output()
                .expect("run kubectl"),
        )
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The last lines of each component's log (what a failing test prints).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            let path = self.log_path(name);
            let mut text = String::new();
            if std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_string(&mut text))
                .is_err()
            {
                continue;
            }
            // mini-etcd logs every request as a warning; those lines say nothing about a failure.
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("\"msg\":\"request stats\""))
                .collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            out.push_str(&format!(
                "--- last {} lines of {} ---\n{}\n",
                tail.len(),
                path.display(),
                tail.join("\n")
            ));
        }
        out
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for (_, child) in self.children.lock().unwrap().iter_mut().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
    }
}

/// The control plane shared by every test in this process, started on first use. A test that panics
/// prints the components' log tails.
pub fn shared() -> &'static ControlPlane {
    shared_with_crds(Vec::new)
}

static PLANE: OnceLock<ControlPlane> = OnceLock::new();

/// [`shared`], started with the CRDs `crds` gives ([`ControlPlane::start_with_crds`]) when this call is the
/// first; tests still install what they need (idempotent).
pub fn shared_with_crds(crds: impl FnOnce() -> Vec<String>) -> &'static ControlPlane {
    PLANE.get_or_init(|| {
        let crds = crds();
        // Started on a thread of its own: readiness is checked with an async client, and the caller may be
        // inside a runtime already.
        let plane = std::thread::spawn(move || ControlPlane::start_with_crds(&crds))
            .join()
            .expect("control plane start thread")
            .unwrap_or_else(|e| panic!("start the test control plane: {e:#}"));
        eprintln!(
            "test control plane (Kubernetes {KUBERNETES_VERSION}) at {} ready in {:.1?}",
            plane.url, plane.started_in
        );
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if let Some(plane) = PLANE.get() {
                eprintln!("{}", plane.logs());
            }
        }));
        plane
    })
}

/// Builds a client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    // kube's rustls wants a process-wide provider when more than one is linked.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Applies a CustomResourceDefinition given as YAML (server-side, as `kubectl apply --server-side` does)
/// and waits until it is Established; returns its name. Idempotent.
pub async fn install_crd_yaml(client: &kube::Client, yaml: &str) -> anyhow::Result<String> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crd: CustomResourceDefinition = serde_norway::from_str(yaml).context("parse the CRD")?;
    let name = crd.metadata.name.clone().context("CRD without a name")?;
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("outbox-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .with_context(|| format!("the API server refused CRD {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let established = api.get(&name).await?.status.is_some_and(|s| {
            s.conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return Ok(name);
        }
        if Instant::now() > deadline {
            bail!("CRD {name} not Established within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stands in for the kubelet, which this control plane does not have: writes `Running` and `Ready=True`
/// through `pods/status` for up to `count` Pods in `namespace` matching `selector` (oldest first); returns
/// how many it marked.
pub async fn mark_pods_ready(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
    count: usize,
) -> anyhow::Result<usize> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let mut pods = api
        .list(&ListParams::default().labels(selector))
        .await?
        .items;
    pods.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
    pods.truncate(count);
    // Whole seconds: the API server's timestamps have no fraction.
    let now =
        k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second())?;
    let mut marked = 0;
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let containers: Vec<serde_json::Value> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| {
                serde_json::json!({
                    "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                    "ready": true, "started": true, "restartCount": 0,
                    "state": {"running": {"startedAt": now.to_string()}},
                })
            })
            .collect();
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": "10.244.0.10",
            "startTime": now.to_string(),
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now.to_string()},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now.to_string()},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now.to_string()},
                {"type": "Ready", "status": "True", "lastTransitionTime": now.to_string()},
            ],
            "containerStatuses": containers,
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("write status of pod {namespace}/{name}"))?;
        marked += 1;
    }
    Ok(marked)
}

/// Runs `scripts/helm.py` (Helm's own library, helm-python-sdk) with the venv `scripts/setup.sh` installs;
/// returns its JSON output. `args` as the script's usage says (`render CHART RELEASE NAMESPACE VALUES`, ...).
pub fn helm(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = crate::cache_dir().join("manifests-venv/bin/python");
    if !python.exists() {
        bail!(
            "{} not found: run `make setup` (installs Helm's library)",
            python.display()
        );
    }
    let out = Command::new(&python)
        .arg(root.join("scripts/helm.py"))
        .args(args)
        .current_dir(&root)
        .output()
        .context("run scripts/helm.py")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The chart's manifests as Helm renders them for `release` in `namespace`.
pub fn render_chart(
    release: &str,
    namespace: &str,
    values: &serde_json::Value,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/outbox-operator");
    let docs = helm(&[
        "render",
        chart.to_str().context("chart path")?,
        release,
        namespace,
        &values.to_string(),
    ])?;
    Ok(docs.as_array().cloned().unwrap_or_default())
}

fn readyz() -> http::Request<Vec<u8>> {
    http::Request::get("/readyz").body(vec![]).expect("request")
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Body of a plain-HTTP GET on loopback, `None` on any failure.
fn http_get_plain(port: u16, path: &str) -> Option<String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.").then_some(body)
}

fn etcd_is_upstream(etcd: &Path) -> bool {
    Command::new(etcd)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).contains("advertise-client-urls")
                || String::from_utf8_lossy(&o.stderr).contains("advertise-client-urls")
        })
        .unwrap_or(false)
}

enum User<'a> {
    Certificate(&'a Path, &'a Path),
    Token(&'a str),
}

fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user: User<'_>,
    namespace: &str,
) -> anyhow::Result<()> {
    let user = match user {
        User::Certificate(cert, key) => serde_json::json!({
            "client-certificate": cert, "client-key": key,
        }),
        User::Token(token) => serde_json::json!({ "token": token }),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
        "current-context": "test",
    });
    // JSON is YAML: kubectl, kube-rs and the Kubernetes binaries all read it.
    std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// The certificates of one control plane: a CA, the API server's serving certificate, client certificates
/// for the admin and the controller-manager, and the service-account token signing key.
struct Pki {
    files: Vec<(String, String)>,
}

impl Pki {
    fn generate() -> anyhow::Result<Self> {
        use rcgen::{ExtendedKeyUsagePurpose, KeyPair};
        let ca = crate::tls::TestCa::new("outbox-test-ca")?;
        let mut files = vec![
            ("ca.crt".to_string(), ca.pem().to_owned()),
            ("ca.key".to_string(), ca.key_pem()),
        ];
        let mut leaf = |stem: &str,
                        sans: &[&str],
                        cn: &str,
                        org: Option<&str>,
                        usage: ExtendedKeyUsagePurpose|
         -> anyhow::Result<()> {
            let l = ca.issue(cn, sans, org, usage)?;
            files.push((format!("{stem}.crt"), l.cert_pem));
            files.push((format!("{stem}.key"), l.key_pem));
            Ok(())
        };
        leaf(
            "apiserver",
            &[
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default.svc",
                "10.96.0.1",
            ],
            "kube-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        leaf(
            "admin",
            &[],
            "outbox-test-admin",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        leaf(
            "controller-manager",
            &[],
            "system:kube-controller-manager",
            None,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let sa = KeyPair::generate()?;
        files.push(("sa.key".to_string(), sa.serialize_pem()));
        files.push(("sa.pub".to_string(), sa.public_key_pem()));
        Ok(Self { files })
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (name, pem) in &self.files {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }
}
