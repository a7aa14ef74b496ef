//! The `demo-consumer` binary refuses unusable settings with exit code 2 and one line naming the flag and
//! its environment variable, before touching the database or the broker.

const BIN: &str = env!("CARGO_BIN_EXE_demo-consumer");
const UNSET: &[&str] = &["DATABASE_URL", "KAFKA_BOOTSTRAP"];

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
        test_support::cli::assert_refused(BIN, &args, &[], UNSET, line);
    }
    // clap's own refusal (a missing required flag) names it too, with a usage hint.
    let (code, stderr) = test_support::cli::run(BIN, &["--database-url", url], &[], UNSET);
    assert_eq!(code, Some(2), "a missing --role: {stderr}");
    assert!(stderr.contains("--role"), "{stderr}");
}
