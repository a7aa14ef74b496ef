//! The `demo-api` binary refuses unusable settings with exit code 2 and one line naming the flag and its
//! environment variable.

use std::process::Command;

#[test]
fn bad_settings_exit_2_with_one_line() {
    for (args, line) in [
        (
            vec!["--topics", "a b"],
            "demo-api: invalid --topics (DEMO_TOPICS):",
        ),
        (
            vec![],
            "demo-api: invalid --database-url (DATABASE_URL): is required",
        ),
        (
            vec!["--database-url", "mysql://x/y"],
            "demo-api: invalid --database-url (DATABASE_URL): must start with postgres://",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_demo-api"))
            .args(&args)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(line), "{args:?}: {stderr}");
    }
}
