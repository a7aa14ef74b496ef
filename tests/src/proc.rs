//! A supervised child process: logs prefixed with its name (echoed or kept for inspection), SIGTERM
//! then SIGKILL on stop, and a watchdog that kills it if this process dies first.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How to start a process (kept to restart it).
#[derive(Debug, Clone)]
pub struct Spec {
    /// Name in logs, e.g. `pharmacy-1`.
    pub name: String,
    /// Executable.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment additions.
    pub env: Vec<(String, String)>,
    /// Port of its /healthz, /readyz, /metrics.
    pub http_port: u16,
}

/// Lines kept per process.
const KEPT_LINES: usize = 400;

/// A running (or exited) child.
pub struct Proc {
    /// How it was started.
    pub spec: Spec,
    child: Child,
    logs: Arc<Mutex<VecDeque<String>>>,
}

fn color(name: &str) -> &'static str {
    const COLORS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];
    let h = name
        .bytes()
        .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
    COLORS[h % COLORS.len()]
}

impl Proc {
    /// Starts `spec`; its output goes to the kept log and, when `echo`, to stdout prefixed by its name.
    pub fn start(spec: Spec, echo: bool) -> anyhow::Result<Self> {
        let mut child = Command::new(&spec.program)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: Ctrl-C in the terminal reaches the supervisor only, which then
            // stops the children in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {} ({})", spec.name, spec.program.display()))?;
        if let Some(pid) = child.id() {
            test_support::reaper::watch(pid, "KILL", None);
        }
        let logs = Arc::new(Mutex::new(VecDeque::with_capacity(KEPT_LINES)));
        let prefix = if std::io::stdout().is_terminal() {
            format!("\x1b[{}m{:>14} |\x1b[0m", color(&spec.name), spec.name)
        } else {
            format!("{:>14} |", spec.name)
        };
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        for stream in [
            Box::new(out) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(err),
        ] {
            let logs = logs.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if echo {
                        println!("{prefix} {line}");
                    }
                    let mut l = logs.lock().unwrap();
                    if l.len() == KEPT_LINES {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            });
        }
        Ok(Self { spec, child, logs })
    }

    /// The last lines it wrote.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().iter().cloned().collect()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("the process has exited")?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("signal {signal}"))?;
        Ok(())
    }

    /// Kills it with SIGKILL (a crash) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns the exit status.
    pub async fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(s) = self.exited() {
            return Some(s);
        }
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                self.child.wait().await.ok()
            }
        }
    }

    /// Waits for it to exit.
    pub async fn wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.wait().await.ok()
    }
}
