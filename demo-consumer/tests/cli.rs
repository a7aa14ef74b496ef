//! The `demo-consumer` binary refuses unusable settings with exit code 2 and one line naming the flag and
//! its environment variable, before touching the database or the broker.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_demo-consumer"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BOOTSTRAP")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[test]
fn bad_settings_exit_2_with_one_line() {
    let url = "postgres://nobody@127.0.0.1:1/none";
    for (args, line) in [
        (
            vec![
                "--role",
                "pharmacy",
                "--database-url",
                url,
                "--brokers",
                "nohost",
            ],
            "demo-consumer: invalid --brokers (KAFKA_BOOTSTRAP): `nohost` is not host:port",
        ),
        (
            vec!["--role", "pharmacy", "--brokers", "k:9092"],
            "demo-consumer: invalid --database-url (DATABASE_URL): is required",
        ),
        (
            vec![
                "--role",
                "notification",
                "--database-url",
                url,
                "--topics",
                "a b",
            ],
            "demo-consumer: invalid --topics (CONSUMER_TOPICS):",
        ),
        (
            vec![
                "--role",
                "pharmacy",
                "--database-url",
                url,
                "--session-timeout",
                "30s",
                "--rejoin-timeout",
                "20s",
            ],
            "demo-consumer: invalid --rejoin-timeout (CONSUMER_REJOIN_TIMEOUT): must be longer than --session-timeout",
        ),
    ] {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(line), "{args:?}: {stderr}");
    }
    let (code, stderr) = run(&["--database-url", url]);
    assert_eq!(code, Some(2), "a missing --role: {stderr}");
    assert!(stderr.contains("--role"), "{stderr}");
}
