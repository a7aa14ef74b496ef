//! TLS and SASL for the product's PostgreSQL (feature `database`) and Kafka clients, from flags that name
//! mounted files. The same flags and environment variables in every process (relay, consumers, demo API); the
//! operator sets them when a resource has `kafka.tls`, `kafka.authentication` or `database.tls`.
//!
//! Files, not values: the operator mounts the referenced Secrets read-only, so no credential is in the pod's
//! environment, and a rotated Secret rolls the pods (which read the files at start).

use std::path::{Path, PathBuf};

use contract::env::security;
#[cfg(feature = "database")]
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::service::config_error;

#[cfg(feature = "database")]
/// TLS to PostgreSQL. With a CA file the connection is `verify-full`: the server's certificate must be
/// signed by that CA and name the host connected to.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct DatabaseTlsArgs {
    /// CA certificate(s) (PEM) that signed the database server's certificate; sets `sslmode=verify-full`.
    #[arg(long, env = security::DATABASE_CA_FILE, global = true)]
    pub database_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for certificate authentication (with --database-key-file).
    #[arg(long, env = security::DATABASE_CERT_FILE, global = true)]
    pub database_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = security::DATABASE_KEY_FILE, global = true)]
    pub database_key_file: Option<PathBuf>,
}

#[cfg(feature = "database")]
impl DatabaseTlsArgs {
    /// `opts` with these settings; a file that cannot be read, or a certificate without its key, is a
    /// [`ConfigError`](crate::service::ConfigError) naming the flag.
    pub fn apply(&self, mut opts: PgConnectOptions) -> anyhow::Result<PgConnectOptions> {
        if let Some(ca) = &self.database_ca_file {
            readable(ca, "--database-ca-file", "DATABASE_CA_FILE")?;
            opts = opts.ssl_mode(PgSslMode::VerifyFull).ssl_root_cert(ca);
        }
        if let Some((cert, key)) = cert_and_key(
            &self.database_cert_file,
            ("--database-cert-file", "DATABASE_CERT_FILE"),
            &self.database_key_file,
            ("--database-key-file", "DATABASE_KEY_FILE"),
        )? {
            opts = opts.ssl_client_cert(cert).ssl_client_key(key);
        }
        Ok(opts)
    }
}

/// A SASL mechanism librdkafka is built with here (OpenSSL provides SCRAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    /// Username and password in the clear (use it over TLS only).
    Plain,
    /// SCRAM with SHA-256.
    #[value(name = "scram-sha-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[value(name = "scram-sha-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The `sasl.mechanism` value.
    pub fn property(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// TLS and SASL to Kafka. TLS is on with `--kafka-tls` or any certificate flag; without a CA file the
/// brokers' certificates are checked against the system's CA bundle (public-CA services).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct KafkaSecurityArgs {
    /// Connect to the brokers over TLS.
    #[arg(long, env = security::KAFKA_TLS, default_value_t = false, action = clap::ArgAction::Set)]
    pub kafka_tls: bool,
    /// CA certificate(s) (PEM) for the brokers' certificates (repeat or comma-separate; default: the
    /// system's CA bundle).
    #[arg(long, env = security::KAFKA_CA_FILE, value_delimiter = ',')]
    pub kafka_ca_file: Vec<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --kafka-key-file).
    #[arg(long, env = security::KAFKA_CERT_FILE)]
    pub kafka_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = security::KAFKA_KEY_FILE)]
    pub kafka_key_file: Option<PathBuf>,
    /// SASL mechanism (with --kafka-sasl-username and --kafka-sasl-password-file).
    #[arg(long, env = security::KAFKA_SASL_MECHANISM, value_enum)]
    pub kafka_sasl_mechanism: Option<SaslMechanism>,
    /// SASL username.
    #[arg(long, env = security::KAFKA_SASL_USERNAME)]
    pub kafka_sasl_username: Option<String>,
    /// File holding the SASL password (trailing newline ignored).
    #[arg(long, env = security::KAFKA_SASL_PASSWORD_FILE)]
    pub kafka_sasl_password_file: Option<PathBuf>,
}

impl KafkaSecurityArgs {
    /// Whether the connection uses TLS.
    pub fn tls(&self) -> bool {
        self.kafka_tls || !self.kafka_ca_file.is_empty() || self.kafka_cert_file.is_some()
    }

    /// The librdkafka properties these settings stand for, read from the files (IO: reads the password;
    /// with several CA files, writes one bundle of them under `bundle_dir`). Empty when nothing is set.
    /// Errors are [`ConfigError`](crate::service::ConfigError)s naming the flag.
    pub fn properties(&self, bundle_dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| p.push((k.to_owned(), v));
        let sasl = self.sasl()?;
        let tls = self.tls();
        match (tls, sasl.is_some()) {
            (false, false) => return Ok(Vec::new()),
            (true, false) => set("security.protocol", "ssl".into()),
            (false, true) => set("security.protocol", "sasl_plaintext".into()),
            (true, true) => set("security.protocol", "sasl_ssl".into()),
        }
        match self.kafka_ca_file.as_slice() {
            [] => {}
            [one] => {
                readable(one, "--kafka-ca-file", "KAFKA_CA_FILE")?;
                set("ssl.ca.location", one.display().to_string());
            }
            several => set(
                "ssl.ca.location",
                ca_bundle(several, bundle_dir)?.display().to_string(),
            ),
        }
        if let Some((cert, key)) = cert_and_key(
            &self.kafka_cert_file,
            ("--kafka-cert-file", "KAFKA_CERT_FILE"),
            &self.kafka_key_file,
            ("--kafka-key-file", "KAFKA_KEY_FILE"),
        )? {
            set("ssl.certificate.location", cert.display().to_string());
            set("ssl.key.location", key.display().to_string());
        }
        if let Some((mechanism, username, password)) = sasl {
            set("sasl.mechanism", mechanism.property().into());
            set("sasl.username", username);
            set("sasl.password", password);
        }
        Ok(p)
    }

    /// Mechanism, username and the password read from its file; all three or none.
    fn sasl(&self) -> anyhow::Result<Option<(SaslMechanism, String, String)>> {
        let (m, u, f) = (
            self.kafka_sasl_mechanism,
            self.kafka_sasl_username
                .as_deref()
                .filter(|u| !u.is_empty()),
            self.kafka_sasl_password_file.as_deref(),
        );
        let Some(m) = m else {
            return match (u, f) {
                (None, None) => Ok(None),
                _ => Err(config_error(
                    "--kafka-sasl-mechanism",
                    "KAFKA_SASL_MECHANISM",
                    "is required with a SASL username or password",
                )),
            };
        };
        let u = u.ok_or_else(|| {
            config_error(
                "--kafka-sasl-username",
                "KAFKA_SASL_USERNAME",
                "is required with --kafka-sasl-mechanism",
            )
        })?;
        let f = f.ok_or_else(|| {
            config_error(
                "--kafka-sasl-password-file",
                "KAFKA_SASL_PASSWORD_FILE",
                "is required with --kafka-sasl-mechanism",
            )
        })?;
        let password = std::fs::read_to_string(f).map_err(|e| {
            config_error(
                "--kafka-sasl-password-file",
                "KAFKA_SASL_PASSWORD_FILE",
                format!("{}: {e}", f.display()),
            )
        })?;
        let password = password.trim_end_matches(['\r', '\n']).to_owned();
        if password.is_empty() {
            return Err(config_error(
                "--kafka-sasl-password-file",
                "KAFKA_SASL_PASSWORD_FILE",
                format!("{} is empty", f.display()),
            ));
        }
        Ok(Some((m, u.to_owned(), password)))
    }
}

/// Librdkafka takes one CA file (OpenSSL reads every certificate in it), so several become one bundle.
fn ca_bundle(files: &[PathBuf], dir: &Path) -> anyhow::Result<PathBuf> {
    let mut bundle = String::new();
    for f in files {
        let pem = std::fs::read_to_string(f).map_err(|e| {
            config_error(
                "--kafka-ca-file",
                "KAFKA_CA_FILE",
                format!("{}: {e}", f.display()),
            )
        })?;
        bundle.push_str(pem.trim_end());
        bundle.push('\n');
    }
    let path = dir.join(format!("outbox-kafka-ca-{}.pem", std::process::id()));
    std::fs::write(&path, bundle).map_err(|e| {
        config_error(
            "--kafka-ca-file",
            "KAFKA_CA_FILE",
            format!("{}: {e}", path.display()),
        )
    })?;
    Ok(path)
}

/// A client certificate and its key, both readable, or neither; one without the other is a
/// [`ConfigError`](crate::service::ConfigError) naming the missing flag.
fn cert_and_key<'a>(
    cert: &'a Option<PathBuf>,
    cert_flag: (&'static str, &'static str),
    key: &'a Option<PathBuf>,
    key_flag: (&'static str, &'static str),
) -> anyhow::Result<Option<(&'a Path, &'a Path)>> {
    match (cert, key) {
        (Some(c), Some(k)) => {
            readable(c, cert_flag.0, cert_flag.1)?;
            readable(k, key_flag.0, key_flag.1)?;
            Ok(Some((c, k)))
        }
        (Some(_), None) => Err(config_error(
            key_flag.0,
            key_flag.1,
            format!("is required with {}", cert_flag.0),
        )),
        (None, Some(_)) => Err(config_error(
            cert_flag.0,
            cert_flag.1,
            format!("is required with {}", key_flag.0),
        )),
        (None, None) => Ok(None),
    }
}

fn readable(path: &Path, flag: &'static str, env: &'static str) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| config_error(flag, env, format!("{}: {e}", path.display())))
}

/// Merges the typed security properties into the `--kafka-config` ones; a key set by both is refused, so a
/// typed setting is never silently overridden.
pub fn merge_kafka_properties(
    extra: Vec<(String, String)>,
    security: Vec<(String, String)>,
    extra_flag: (&'static str, &'static str),
) -> anyhow::Result<Vec<(String, String)>> {
    if let Some((k, _)) = extra
        .iter()
        .find(|(k, _)| security.iter().any(|(s, _)| s == k))
    {
        return Err(config_error(
            extra_flag.0,
            extra_flag.1,
            format!("`{k}` is also set by the --kafka-tls/--kafka-ca-file/--kafka-sasl-* flags; set it once"),
        ));
    }
    Ok(extra.into_iter().chain(security).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn kv(p: &[(String, String)]) -> std::collections::BTreeMap<&str, &str> {
        p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn nothing_set_means_no_properties() {
        let dir = tempfile::tempdir().unwrap();
        assert!(KafkaSecurityArgs::default()
            .properties(dir.path())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn scram_over_tls_with_a_private_ca() {
        let dir = tempfile::tempdir().unwrap();
        let args = KafkaSecurityArgs {
            kafka_ca_file: vec![file(dir.path(), "ca.crt", "CA")],
            kafka_sasl_mechanism: Some(SaslMechanism::ScramSha512),
            kafka_sasl_username: Some("shop".into()),
            kafka_sasl_password_file: Some(file(dir.path(), "password", "s3cret\n")),
            ..Default::default()
        };
        let p = args.properties(dir.path()).unwrap();
        let p = kv(&p);
        assert_eq!(p["security.protocol"], "sasl_ssl");
        assert_eq!(p["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(p["sasl.username"], "shop");
        assert_eq!(
            p["sasl.password"], "s3cret",
            "the trailing newline is not part of it"
        );
        assert!(p["ssl.ca.location"].ends_with("ca.crt"));
    }

    #[test]
    fn mutual_tls_and_a_ca_bundle_from_several_files() {
        let dir = tempfile::tempdir().unwrap();
        let args = KafkaSecurityArgs {
            kafka_ca_file: vec![
                file(dir.path(), "old.crt", "OLD\n"),
                file(dir.path(), "new.crt", "NEW"),
            ],
            kafka_cert_file: Some(file(dir.path(), "user.crt", "C")),
            kafka_key_file: Some(file(dir.path(), "user.key", "K")),
            ..Default::default()
        };
        let p = args.properties(dir.path()).unwrap();
        let p = kv(&p);
        assert_eq!(p["security.protocol"], "ssl");
        assert!(p["ssl.certificate.location"].ends_with("user.crt"));
        assert!(p["ssl.key.location"].ends_with("user.key"));
        assert_eq!(
            std::fs::read_to_string(p["ssl.ca.location"]).unwrap(),
            "OLD\nNEW\n"
        );
        assert!(!p.contains_key("sasl.mechanism"));
    }

    #[test]
    fn incomplete_or_unreadable_settings_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let err = |a: KafkaSecurityArgs| a.properties(dir.path()).unwrap_err().to_string();
        assert_eq!(
            err(KafkaSecurityArgs {
                kafka_sasl_mechanism: Some(SaslMechanism::Plain),
                kafka_sasl_username: Some("u".into()),
                ..Default::default()
            }),
            "invalid --kafka-sasl-password-file (KAFKA_SASL_PASSWORD_FILE): is required with --kafka-sasl-mechanism"
        );
        assert!(err(KafkaSecurityArgs {
            kafka_sasl_username: Some("u".into()),
            ..Default::default()
        })
        .starts_with("invalid --kafka-sasl-mechanism (KAFKA_SASL_MECHANISM)"));
        assert!(err(KafkaSecurityArgs {
            kafka_cert_file: Some(dir.path().join("c")),
            ..Default::default()
        })
        .starts_with("invalid --kafka-key-file (KAFKA_KEY_FILE): is required"));
        let missing = err(KafkaSecurityArgs {
            kafka_ca_file: vec![dir.path().join("absent.crt")],
            ..Default::default()
        });
        assert!(
            missing.starts_with("invalid --kafka-ca-file (KAFKA_CA_FILE): ")
                && missing.contains("absent.crt"),
            "{missing}"
        );
        assert!(err(KafkaSecurityArgs {
            kafka_sasl_mechanism: Some(SaslMechanism::Plain),
            kafka_sasl_username: Some("u".into()),
            kafka_sasl_password_file: Some(file(dir.path(), "empty", "\n")),
            ..Default::default()
        })
        .ends_with("empty is empty"));
    }

    #[test]
    fn a_key_set_twice_is_refused() {
        let s = |k: &str| vec![(k.to_owned(), "x".to_owned())];
        let flag = ("--kafka-config", "RELAY_KAFKA_CONFIG");
        let e = merge_kafka_properties(s("security.protocol"), s("security.protocol"), flag)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid --kafka-config (RELAY_KAFKA_CONFIG): `security.protocol`"),
            "{e}"
        );
        assert_eq!(
            merge_kafka_properties(s("acks"), s("security.protocol"), flag)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    #[cfg(feature = "database")]
    fn database_tls_needs_cert_and_key_together_and_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = PgConnectOptions::new();
        let e = DatabaseTlsArgs {
            database_cert_file: Some(file(dir.path(), "c", "C")),
            ..Default::default()
        }
        .apply(base.clone())
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid --database-key-file (DATABASE_KEY_FILE): is required with --database-cert-file"
        );
        let e = DatabaseTlsArgs {
            database_ca_file: Some(dir.path().join("nope.crt")),
            ..Default::default()
        }
        .apply(base.clone())
        .unwrap_err();
        assert!(e
            .to_string()
            .starts_with("invalid --database-ca-file (DATABASE_CA_FILE): "));
        let ok = DatabaseTlsArgs {
            database_ca_file: Some(file(dir.path(), "ca.crt", "CA")),
            ..Default::default()
        }
        .apply(base)
        .unwrap();
        assert!(format!("{ok:?}").contains("VerifyFull"), "{ok:?}");
    }
}
