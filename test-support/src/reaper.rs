//! Server processes shared by a whole test binary live in statics, which are never dropped. A small
//! shell watchdog per server stops it (and removes its data) once this process is gone, so no test run
//! leaves a postgres or tansu behind, even after a panic or SIGKILL.

use std::path::Path;
use std::process::{Command, Stdio};

/// Starts the watchdog for `child_pid`; `data_dir` is removed after the child has stopped.
// Never waited on by design: the watchdog's whole job is to outlive this process.
#[allow(clippy::zombie_processes)]
pub fn watch(child_pid: u32, signal: &str, data_dir: Option<&Path>) {
    let me = std::process::id();
    let cleanup = data_dir
        .map(|d| format!("; rm -rf '{}'", d.display()))
        .unwrap_or_default();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -{signal} {child_pid} 2>/dev/null; \
         for i in $(seq 1 40); do kill -0 {child_pid} 2>/dev/null || break; sleep 0.25; done; \
         kill -KILL {child_pid} 2>/dev/null{cleanup}"
    );
    let mut cmd = Command::new("sh");
    // Its own process group: a supervisor that kills our whole group must not take the watchdog along.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watchdog shell");
}
