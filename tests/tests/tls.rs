//! TLS for real. PostgreSQL runs with `ssl=on` and a certificate from a test CA; the broker (tansu) is
//! reachable only through a TLS listener (stunnel) that requires a client certificate from the same CA.
//! The demo API, the relay and both consumer groups connect with `verify-full` to the database and with
//! mutual TLS to Kafka, through the flags the operator sets in pods (`DATABASE_CA_FILE`, `KAFKA_CA_FILE`,
//! `KAFKA_CERT_FILE`, `KAFKA_KEY_FILE`). A server whose certificate another CA signed is refused, and the
//! process says why.

use std::path::PathBuf;
use std::time::Duration;

use e2e::bins::bin;
use e2e::load::post_orders;
use e2e::proc::{Proc, Spec};
use e2e::stack::{Options, Stack};
use test_support::kafka::TlsTansu;
use test_support::pg::{Durability, PgServer};
use test_support::tls::{write, TestCa};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A CA, a PostgreSQL server and a mutual-TLS broker with certificates it signed, and a client
/// certificate; plus a second CA that signed nothing here.
struct Secured {
    dir: tempfile::TempDir,
    pg: PgServer,
    broker: TlsTansu,
}

impl Secured {
    async fn start() -> Self {
        let ca = TestCa::new("outbox-test-ca").unwrap();
        let other = TestCa::new("some-other-ca").unwrap();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ca.crt", ca.pem()).unwrap();
        write(dir.path(), "other-ca.crt", other.pem()).unwrap();
        let client = ca.client("outbox-test-client").unwrap();
        write(dir.path(), "client.crt", &client.cert_pem).unwrap();
        write(dir.path(), "client.key", &client.key_pem).unwrap();
        let pg_cert = ca.loopback_server().unwrap();
        let pg = tokio::task::spawn_blocking(move || {
            PgServer::start_with_tls(Durability::Throwaway, &pg_cert.cert_pem, &pg_cert.key_pem)
        })
        .await
        .unwrap()
        .unwrap();
        let kafka_cert = ca.loopback_server().unwrap();
        let broker =
            TlsTansu::start(&kafka_cert.cert_pem, &kafka_cert.key_pem, Some(ca.pem())).unwrap();
        Self { dir, pg, broker }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The environment of a process that trusts `ca` (a file in the temp dir) for both servers.
    fn env(&self, ca: &str) -> Vec<(String, String)> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            ("DATABASE_CA_FILE".into(), p(ca)),
            ("KAFKA_CA_FILE".into(), p(ca)),
            ("KAFKA_CERT_FILE".into(), p("client.crt")),
            ("KAFKA_KEY_FILE".into(), p("client.key")),
        ]
    }

    fn admin_config(&self) -> Vec<(String, String)> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            ("security.protocol".into(), "ssl".into()),
            ("ssl.ca.location".into(), p("ca.crt")),
            ("ssl.certificate.location".into(), p("client.crt")),
            ("ssl.key.location".into(), p("client.key")),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_flow_with_verify_full_to_postgres_and_mutual_tls_to_kafka() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Secured::start().await;
    // `sslmode=disable` in the URL: the test's own pool connects in the clear, while the processes'
    // `DATABASE_CA_FILE` makes theirs verify-full regardless of the URL.
    let db = format!("{}?sslmode=disable", s.pg.create_database().await.unwrap());
    let mut stack = Stack::start(Options {
        database_url: Some(db),
        kafka_bootstrap: Some(s.broker.bootstrap()),
        partitions: 2,
        pharmacy: 1,
        notification: 1,
        extra_env: s.env("ca.crt"),
        kafka_admin_config: s.admin_config(),
        ..Options::default()
    })
    .await
    .unwrap();
    post_orders(&stack.api, 50, 4, false).await.unwrap();
    let l = stack.settle(Duration::from_secs(90)).await;
    assert_eq!(l.orders, 50);
    // The API's, the relay's and the consumers' sessions are encrypted (the stack's own pool is not:
    // the server accepts both, so this tells the product's clients from the test's).
    let mine: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(!mine, "the test's own pool connects without TLS");
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE s.ssl AND a.datname = current_database()",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(
        sessions >= 3,
        "expected TLS sessions from the API, the relay and the consumers; saw {sessions}"
    );
    stack.stop().await;
}

/// Starts the relay with `env` and returns the first log line containing one of `needles` (the
/// process keeps retrying, as it would in a pod, so the test stops it).
async fn relay_says(s: &Secured, env: Vec<(String, String)>, needles: &[&str]) -> String {
    process_says(s, "outbox-relay", &["run"], env, needles).await
}

/// [`relay_says`] for any of the product's binaries (`args` before `--http-addr`).
async fn process_says(
    s: &Secured,
    program: &str,
    args: &[&str],
    env: Vec<(String, String)>,
    needles: &[&str],
) -> String {
    let db = s.pg.create_database().await.unwrap();
    let port = test_support::free_port();
    let mut all_env = vec![
        ("DATABASE_URL".into(), db),
        ("KAFKA_BOOTSTRAP".into(), s.broker.bootstrap()),
    ];
    all_env.extend(env);
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--http-addr".into(), format!("127.0.0.1:{port}")]);
    let mut p = Proc::start(
        Spec {
            name: program.into(),
            program: bin(program).unwrap(),
            args,
            env: all_env,
            http_port: port,
        },
        false,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(line) = p
            .logs()
            .into_iter()
            .find(|l| needles.iter().any(|n| l.contains(n)))
        {
            p.stop(Duration::from_secs(5)).await;
            return line;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{program} never said any of {needles:?}; its lines:\n{}",
                p.logs().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_another_ca_signed_is_refused_with_the_reason() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Secured::start().await;
    // The database's certificate is not from the CA the relay trusts.
    let line = relay_says(
        &s,
        s.env("other-ca.crt"),
        &["database unreachable", "UnknownIssuer"],
    )
    .await;
    assert!(
        line.contains("database unreachable") && line.to_lowercase().contains("certificate"),
        "{line}"
    );
    // The same for the demo API and a consumer.
    for (program, args) in [
        ("demo-api", vec![]),
        ("demo-consumer", vec!["--role", "pharmacy"]),
    ] {
        let line = process_says(
            &s,
            program,
            &args,
            s.env("other-ca.crt"),
            &["database unreachable"],
        )
        .await;
        assert!(line.contains("UnknownIssuer"), "{program}: {line}");
    }
    // The database is trusted, the broker's certificate is not.
    let mut env = s.env("ca.crt");
    env.retain(|(k, _)| k != "KAFKA_CA_FILE");
    env.push((
        "KAFKA_CA_FILE".into(),
        s.path("other-ca.crt").display().to_string(),
    ));
    let line = relay_says(&s, env, &["certificate verify failed"]).await;
    assert!(line.contains("certificate verify failed"), "{line}");
    // Trusted broker, but no client certificate: the listener requires one.
    let mut env = s.env("ca.crt");
    env.retain(|(k, _)| k != "KAFKA_CERT_FILE" && k != "KAFKA_KEY_FILE");
    env.push(("KAFKA_TLS".into(), "true".into()));
    let line = relay_says(&s, env, &["certificate required"]).await;
    assert!(line.contains("alert certificate required"), "{line}");
    assert!(
        s.broker.log().contains("peer did not return a certificate"),
        "stunnel refused the client without a certificate: {}",
        s.broker.log()
    );
}

/// The CA files a process is given must exist: exit 2, one line naming the flag.
#[test]
fn a_missing_ca_file_is_a_configuration_error() {
    test_support::cli::assert_refused(
        bin("outbox-relay").unwrap(),
        &["run", "--brokers", "127.0.0.1:9"],
        &[
            ("DATABASE_URL", "postgres://x@127.0.0.1:9/x"),
            ("KAFKA_CA_FILE", "/nonexistent/ca.crt"),
        ],
        &[],
        "outbox-relay: invalid --kafka-ca-file (KAFKA_CA_FILE): /nonexistent/ca.crt",
    );
}

/// What a user saw before librdkafka was built with OpenSSL: `security.protocol=SSL` and SCRAM refused
/// at start ("OpenSSL not available at build time", "No provider for SASL mechanism SCRAM-SHA-512"). Now
/// the relay accepts both and goes on to connect (the broker here is not listening, so it retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_scram_settings_are_accepted_by_the_build() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Secured::start().await;
    let closed = test_support::free_port();
    for config in [
        "security.protocol=SSL".to_string(),
        "security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-512,sasl.username=shop,sasl.password=x".to_string(),
        "security.protocol=SASL_PLAINTEXT,sasl.mechanism=SCRAM-SHA-256,sasl.username=shop,sasl.password=x".to_string(),
        "security.protocol=SASL_SSL,sasl.mechanism=OAUTHBEARER,enable.sasl.oauthbearer.unsecure.jwt=true,sasl.oauthbearer.config=principal=shop".to_string(),
        "compression.type=zstd".to_string(),
    ] {
        let mut env = s.env("ca.crt");
        env.retain(|(k, _)| k.starts_with("DATABASE_"));
        env.push(("RELAY_KAFKA_CONFIG".into(), config.clone()));
        env.push(("KAFKA_BOOTSTRAP".into(), format!("127.0.0.1:{closed}")));
        let line = relay_says(&s, env, &["kafka unreachable", "invalid --kafka-config"]).await;
        assert!(line.contains("kafka unreachable"), "{config}: {line}");
    }
}

/// SCRAM as far as a broker here goes: tansu 0.6 answers the SASL handshake, but enables SCRAM only with
/// `--authentication`, where its users cannot be created on in-memory storage (`tansu user create` is refused
/// `NotAuthenticated`). So this checks the client side for real: with the typed flags the relay performs a
/// SCRAM-SHA-512 handshake against the broker (quoted in its log), with the password read from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scram_flags_make_the_relay_perform_a_scram_sha_512_handshake() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Secured::start().await;
    let broker = test_support::kafka::Tansu::start().unwrap();
    let password = s.path("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let mut env = s.env("ca.crt");
    env.retain(|(k, _)| k.starts_with("DATABASE_"));
    env.extend([
        ("KAFKA_BOOTSTRAP".to_string(), broker.bootstrap()),
        (
            "KAFKA_SASL_MECHANISM".to_string(),
            "scram-sha-512".to_string(),
        ),
        ("KAFKA_SASL_USERNAME".to_string(), "shop".to_string()),
        (
            "KAFKA_SASL_PASSWORD_FILE".to_string(),
            password.display().to_string(),
        ),
    ]);
    let line = relay_says(&s, env, &["SASL SCRAM-SHA-512 mechanism handshake"]).await;
    assert!(line.contains("sasl_plaintext://"), "{line}");
}
