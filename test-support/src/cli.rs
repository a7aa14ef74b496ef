//! Runs a binary the way a user's shell or a pod would and checks how it refuses bad settings: exit code 2
//! and one line on stderr naming the setting (the promise of every binary in this workspace).

use std::ffi::OsStr;
use std::process::Command;

/// How long a refusal may take: a setting wrongly accepted would start a process that retries forever,
/// so the run is stopped (`timeout`, exit 124) instead of hanging the test.
const LIMIT_SECONDS: &str = "20";

/// Runs `bin` with `args`, without the environment variables in `unset` and with those in `env`; returns
/// its exit code and its stderr, trimmed.
pub fn run(
    bin: impl AsRef<OsStr>,
    args: &[&str],
    env: &[(&str, &str)],
    unset: &[&str],
) -> (Option<i32>, String) {
    let mut command = Command::new("timeout");
    command.arg(LIMIT_SECONDS).arg(bin).args(args);
    for name in unset {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let out = command.output().expect("run timeout(1)");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// Asserts that `bin` refuses `args` and `env` (with `unset` removed) with exit code 2 and exactly one
/// stderr line that starts with `line`. Returns that line.
pub fn assert_refused(
    bin: impl AsRef<OsStr>,
    args: &[&str],
    env: &[(&str, &str)],
    unset: &[&str],
    line: &str,
) -> String {
    let (code, stderr) = run(bin, args, env, unset);
    assert_eq!(code, Some(2), "{args:?} {env:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?} {env:?}: one line, got: {stderr}"
    );
    assert!(
        stderr.starts_with(line),
        "{args:?} {env:?}: want `{line}…`, got: {stderr}"
    );
    stderr
}
