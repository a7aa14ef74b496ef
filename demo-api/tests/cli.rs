//! The `demo-api` binary refuses unusable settings with exit code 2 and one line naming the flag and its
//! environment variable.

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
        test_support::cli::assert_refused(
            env!("CARGO_BIN_EXE_demo-api"),
            &args,
            &[],
            &["DATABASE_URL"],
            line,
        );
    }
}
