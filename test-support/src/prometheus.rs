//! A Prometheus server (Debian's `prometheus` package, which `make setup` installs) on a free loopback port,
//! with a config and rule files written to its temp dir.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A running Prometheus owned by this process.
pub struct Prometheus {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

/// The prometheus binary: `$PROMETHEUS`, else `/usr/bin/prometheus`.
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("PROMETHEUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/prometheus".into())
}

impl Prometheus {
    /// Starts Prometheus with `config` (prometheus.yml; rule files named relative to its directory) and
    /// `files` (name, text) beside it; returns once `/-/ready` answers.
    pub fn start(config: &str, files: &[(&str, &str)]) -> anyhow::Result<Self> {
        let bin = prometheus_bin();
        if !bin.exists() {
            bail!(
                "{} not found (run `make setup`, or set PROMETHEUS)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("outbox-prometheus-")
            .tempdir()?;
        std::fs::write(dir.path().join("prometheus.yml"), config)?;
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text)?;
        }
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(&bin)
            .current_dir(dir.path())
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        crate::reaper::watch(child.id(), "TERM", None);
        let mut me = Self { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = me.child.try_wait()? {
                bail!("prometheus exited ({status}): {}", me.log());
            }
            if ready(port) {
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready on 127.0.0.1:{port}: {}", me.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Base URL of its HTTP API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// Whether `GET /-/ready` answers 200 (a plain HTTP/1.0 request: test-support has no HTTP client).
fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /-/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
