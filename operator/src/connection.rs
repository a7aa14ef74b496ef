//! How the pods reach Kafka and PostgreSQL securely, from `kafka.tls`, `kafka.authentication` and
//! `database.tls` (pure): the Secret keys a pod reads (as env or as files under [`SECRETS_DIR`]), the
//! environment naming those files (the flags of `process_kit::security`), and the librdkafka properties of the
//! operator's own topic admin, which reads the same keys through the API instead of a mount.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvVar, KeyToPath, ProjectedVolumeSource, SecretProjection, Volume, VolumeMount,
    VolumeProjection,
};

use crate::crd::{DatabaseTls, KafkaAuthenticationType, KafkaSpec};

/// Volume of the mounted Secret keys.
pub const SECRETS_VOLUME: &str = "outbox-secrets";
/// Where they are mounted (read-only).
pub const SECRETS_DIR: &str = "/etc/outbox";
/// File mode of the mounted keys: owner read only (with the pod's `fsGroup` the kubelet adds group read,
/// so the non-root process can read them).
pub const SECRET_FILE_MODE: i32 = 0o400;

/// One Secret key a pod reads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretUse {
    /// Spec path of the reference, for error messages (`spec.kafka.tls.trustedCertificates[0]`).
    pub field: String,
    /// Secret name.
    pub secret: String,
    /// Key in the Secret.
    pub key: String,
    /// Where it is mounted, relative to [`SECRETS_DIR`]; `None` for a key read through an env var.
    pub file: Option<String>,
}

impl SecretUse {
    /// The absolute path of the mounted file.
    pub fn path(&self) -> Option<String> {
        self.file.as_ref().map(|f| format!("{SECRETS_DIR}/{f}"))
    }
}

fn mounted(field: String, secret: &str, key: &str, file: &str) -> SecretUse {
    SecretUse {
        field,
        secret: secret.into(),
        key: key.into(),
        file: Some(file.into()),
    }
}

/// The Secret keys of the Kafka connection that are mounted.
pub fn kafka_files(kafka: &KafkaSpec) -> Vec<SecretUse> {
    let mut v = Vec::new();
    if let Some(tls) = &kafka.tls {
        for (i, c) in tls.trusted_certificates.iter().enumerate() {
            v.push(mounted(
                format!("spec.kafka.tls.trustedCertificates[{i}]"),
                &c.secret_name,
                &c.certificate,
                &format!("kafka/ca-{i}.crt"),
            ));
        }
    }
    if let Some(a) = &kafka.authentication {
        if let Some(ck) = &a.certificate_and_key {
            let f = "spec.kafka.authentication.certificateAndKey";
            v.push(mounted(
                format!("{f}.certificate"),
                &ck.secret_name,
                &ck.certificate,
                "kafka/user.crt",
            ));
            v.push(mounted(
                format!("{f}.key"),
                &ck.secret_name,
                &ck.key,
                "kafka/user.key",
            ));
        }
        if let Some(p) = &a.password_secret {
            v.push(mounted(
                "spec.kafka.authentication.passwordSecret".into(),
                &p.secret_name,
                &p.password,
                "kafka/sasl-password",
            ));
        }
    }
    v
}

/// The Secret keys of the database TLS settings that are mounted.
pub fn database_files(tls: Option<&DatabaseTls>) -> Vec<SecretUse> {
    let Some(tls) = tls else { return Vec::new() };
    let mut v = vec![mounted(
        "spec.database.tls.caSecretRef".into(),
        &tls.ca_secret_ref.name,
        &tls.ca_secret_ref.key,
        "database/ca.crt",
    )];
    if let Some(ck) = &tls.client_certificate {
        let f = "spec.database.tls.clientCertificate";
        v.push(mounted(
            format!("{f}.certificate"),
            &ck.secret_name,
            &ck.certificate,
            "database/client.crt",
        ));
        v.push(mounted(
            format!("{f}.key"),
            &ck.secret_name,
            &ck.key,
            "database/client.key",
        ));
    }
    v
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn path_of(files: &[SecretUse], file: &str) -> Option<String> {
    files
        .iter()
        .find(|u| u.file.as_deref() == Some(file))
        .and_then(SecretUse::path)
}

/// The environment that points the process at the mounted Kafka files (`KAFKA_TLS`, `KAFKA_CA_FILE`, ...).
pub fn kafka_env(kafka: &KafkaSpec) -> Vec<EnvVar> {
    use contract::env::security::*;
    let files = kafka_files(kafka);
    let mut v = Vec::new();
    if kafka.tls.is_some() {
        v.push(env(KAFKA_TLS, "true"));
        let cas: Vec<String> = files
            .iter()
            .filter(|u| u.field.starts_with("spec.kafka.tls."))
            .filter_map(SecretUse::path)
            .collect();
        if !cas.is_empty() {
            v.push(env(KAFKA_CA_FILE, cas.join(",")));
        }
    }
    if let Some(a) = &kafka.authentication {
        match a.type_.env_value() {
            None => {
                if let Some(p) = path_of(&files, "kafka/user.crt") {
                    v.push(env(KAFKA_CERT_FILE, p));
                }
                if let Some(p) = path_of(&files, "kafka/user.key") {
                    v.push(env(KAFKA_KEY_FILE, p));
                }
            }
            Some(mechanism) => {
                v.push(env(KAFKA_SASL_MECHANISM, mechanism));
                if let Some(u) = &a.username {
                    v.push(env(KAFKA_SASL_USERNAME, u.clone()));
                }
                if let Some(p) = path_of(&files, "kafka/sasl-password") {
                    v.push(env(KAFKA_SASL_PASSWORD_FILE, p));
                }
            }
        }
    }
    v
}

/// The environment that points the process at the mounted database files (`DATABASE_CA_FILE`, ...).
pub fn database_env(tls: Option<&DatabaseTls>) -> Vec<EnvVar> {
    use contract::env::security::*;
    let files = database_files(tls);
    [
        (DATABASE_CA_FILE, "database/ca.crt"),
        (DATABASE_CERT_FILE, "database/client.crt"),
        (DATABASE_KEY_FILE, "database/client.key"),
    ]
    .into_iter()
    .filter_map(|(var, file)| path_of(&files, file).map(|p| env(var, p)))
    .collect()
}

/// The projected volume holding every mounted key and its read-only mount; `None` when nothing is mounted.
pub fn secrets_volume(files: &[SecretUse]) -> Option<(Volume, VolumeMount)> {
    if files.is_empty() {
        return None;
    }
    let mut by_secret: BTreeMap<&str, Vec<KeyToPath>> = BTreeMap::new();
    for u in files {
        if let Some(f) = &u.file {
            by_secret.entry(&u.secret).or_default().push(KeyToPath {
                key: u.key.clone(),
                path: f.clone(),
                mode: None,
            });
        }
    }
    let sources = by_secret
        .into_iter()
        .map(|(name, items)| VolumeProjection {
            secret: Some(SecretProjection {
                name: name.into(),
                items: Some(items),
                optional: Some(false),
            }),
            ..Default::default()
        })
        .collect();
    let volume = Volume {
        name: SECRETS_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(SECRET_FILE_MODE),
            sources: Some(sources),
        }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: SECRETS_VOLUME.into(),
        mount_path: SECRETS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    Some((volume, mount))
}

/// Secret data by (Secret, key), as the reconciler read it.
pub type SecretData = BTreeMap<(String, String), Vec<u8>>;

/// The librdkafka properties of the operator's topic admin for `kafka.tls` and `kafka.authentication`: the
/// same settings the pods get, with the PEM and password values inline (`ssl.ca.pem`, ...) because the
/// operator reads the Secrets through the API. Keys missing from `data` are skipped (the reconciler checks
/// them first).
pub fn admin_properties(kafka: &KafkaSpec, data: &SecretData) -> Vec<(String, String)> {
    let value = |u: &SecretUse| {
        data.get(&(u.secret.clone(), u.key.clone()))
            .map(|b| String::from_utf8_lossy(b).trim_end().to_owned())
    };
    let files = kafka_files(kafka);
    let sasl = kafka
        .authentication
        .as_ref()
        .filter(|a| a.type_ != KafkaAuthenticationType::Tls);
    let mut p: Vec<(String, String)> = Vec::new();
    let protocol = match (kafka.tls.is_some(), sasl.is_some()) {
        (false, false) => return p,
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    p.push(("security.protocol".into(), protocol.into()));
    let cas: Vec<String> = files
        .iter()
        .filter(|u| u.field.starts_with("spec.kafka.tls."))
        .filter_map(value)
        .collect();
    if !cas.is_empty() {
        p.push(("ssl.ca.pem".into(), cas.join("\n")));
    }
    for (file, property) in [
        ("kafka/user.crt", "ssl.certificate.pem"),
        ("kafka/user.key", "ssl.key.pem"),
    ] {
        if let Some(v) = files
            .iter()
            .find(|u| u.file.as_deref() == Some(file))
            .and_then(value)
        {
            p.push((property.into(), v));
        }
    }
    if let Some(a) = sasl {
        // librdkafka names mechanisms in capitals (PLAIN, SCRAM-SHA-256).
        let mechanism = a.type_.env_value().unwrap_or_default().to_uppercase();
        p.push(("sasl.mechanism".into(), mechanism));
        p.push((
            "sasl.username".into(),
            a.username.clone().unwrap_or_default(),
        ));
        if let Some(v) = files
            .iter()
            .find(|u| u.file.as_deref() == Some("kafka/sasl-password"))
            .and_then(value)
        {
            p.push(("sasl.password".into(), v));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kafka(v: serde_json::Value) -> KafkaSpec {
        serde_json::from_value(v).unwrap()
    }

    fn env_map(v: Vec<EnvVar>) -> BTreeMap<String, String> {
        v.into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect()
    }

    #[test]
    fn strimzi_tls_with_scram_mounts_the_ca_and_the_password() {
        let k = kafka(json!({
            "bootstrap": "my-cluster-kafka-bootstrap:9093",
            "tls": {"trustedCertificates": [{"secretName": "my-cluster-cluster-ca-cert", "certificate": "ca.crt"}]},
            "authentication": {"type": "scram-sha-512", "username": "shop",
                "passwordSecret": {"secretName": "shop", "password": "password"}},
        }));
        let env = env_map(kafka_env(&k));
        assert_eq!(env["KAFKA_TLS"], "true");
        assert_eq!(env["KAFKA_CA_FILE"], "/etc/outbox/kafka/ca-0.crt");
        assert_eq!(env["KAFKA_SASL_MECHANISM"], "scram-sha-512");
        assert_eq!(env["KAFKA_SASL_USERNAME"], "shop");
        assert_eq!(
            env["KAFKA_SASL_PASSWORD_FILE"],
            "/etc/outbox/kafka/sasl-password"
        );
        assert!(!env.contains_key("KAFKA_CERT_FILE"));
        let (vol, mount) = secrets_volume(&kafka_files(&k)).unwrap();
        assert_eq!(mount.read_only, Some(true));
        assert_eq!(mount.mount_path, SECRETS_DIR);
        let projected = vol.projected.unwrap();
        assert_eq!(projected.default_mode, Some(0o400));
        let sources = projected.sources.unwrap();
        let items: Vec<(String, String, String)> = sources
            .iter()
            .flat_map(|s| {
                let s = s.secret.as_ref().unwrap();
                s.items
                    .clone()
                    .unwrap()
                    .into_iter()
                    .map(move |i| (s.name.clone(), i.key, i.path))
            })
            .collect();
        assert_eq!(
            items,
            [
                (
                    "my-cluster-cluster-ca-cert".into(),
                    "ca.crt".into(),
                    "kafka/ca-0.crt".into()
                ),
                (
                    "shop".into(),
                    "password".into(),
                    "kafka/sasl-password".into()
                ),
            ]
        );
    }

    #[test]
    fn mutual_tls_mounts_certificate_and_key() {
        let k = kafka(json!({
            "bootstrap": "b:9093", "tls": {},
            "authentication": {"type": "tls", "certificateAndKey": {"secretName": "shop", "certificate": "user.crt", "key": "user.key"}},
        }));
        let env = env_map(kafka_env(&k));
        assert_eq!(env["KAFKA_TLS"], "true");
        assert!(
            !env.contains_key("KAFKA_CA_FILE"),
            "no CA listed: the image's bundle"
        );
        assert_eq!(env["KAFKA_CERT_FILE"], "/etc/outbox/kafka/user.crt");
        assert_eq!(env["KAFKA_KEY_FILE"], "/etc/outbox/kafka/user.key");
        assert!(!env.contains_key("KAFKA_SASL_MECHANISM"));
    }

    #[test]
    fn nothing_secured_mounts_nothing() {
        let k = kafka(json!({"bootstrap": "b:9092"}));
        assert!(kafka_env(&k).is_empty());
        assert!(kafka_files(&k).is_empty());
        assert!(database_env(None).is_empty());
        assert!(secrets_volume(&[]).is_none());
        assert!(admin_properties(&k, &SecretData::new()).is_empty());
    }

    #[test]
    fn database_tls_points_at_the_mounted_ca_and_client_certificate() {
        let tls: DatabaseTls = serde_json::from_value(json!({
            "caSecretRef": {"name": "pg-ca", "key": "ca.crt"},
            "clientCertificate": {"secretName": "pg-client", "certificate": "tls.crt", "key": "tls.key"},
        }))
        .unwrap();
        let env = env_map(database_env(Some(&tls)));
        assert_eq!(env["DATABASE_CA_FILE"], "/etc/outbox/database/ca.crt");
        assert_eq!(env["DATABASE_CERT_FILE"], "/etc/outbox/database/client.crt");
        assert_eq!(env["DATABASE_KEY_FILE"], "/etc/outbox/database/client.key");
    }

    #[test]
    fn the_admin_gets_the_same_settings_inline() {
        let k = kafka(json!({
            "bootstrap": "b:9093",
            "tls": {"trustedCertificates": [{"secretName": "ca", "certificate": "ca.crt"}]},
            "authentication": {"type": "plain", "username": "key-id",
                "passwordSecret": {"secretName": "cc", "password": "secret"}},
        }));
        let data = SecretData::from([
            (("ca".into(), "ca.crt".into()), b"PEM\n".to_vec()),
            (("cc".into(), "secret".into()), b"hunter2".to_vec()),
        ]);
        let p: BTreeMap<String, String> = admin_properties(&k, &data).into_iter().collect();
        assert_eq!(p["security.protocol"], "sasl_ssl");
        assert_eq!(p["ssl.ca.pem"], "PEM");
        assert_eq!(p["sasl.mechanism"], "PLAIN");
        assert_eq!(p["sasl.username"], "key-id");
        assert_eq!(p["sasl.password"], "hunter2");
    }
}
