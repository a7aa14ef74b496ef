//! A throwaway PostgreSQL cluster: `initdb` in a temp dir, `postgres` on a free loopback port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::{Connection, Executor, PgConnection, PgPool};

/// How the cluster trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync=off`, `synchronous_commit=off`: for tests, where the data is thrown away.
    Throwaway,
    /// PostgreSQL defaults (fsync, synchronous commit): for benchmarks, so figures mean something.
    Durable,
    /// Synchronous commit on, `fsync=off`: a committed transaction survives a crash of the server process
    /// (SIGKILL, immediate shutdown) though not of the machine — what a chaos test that restarts PostgreSQL
    /// needs, without paying for fsync on a shared disk.
    SurvivesServerCrash,
}

/// A running PostgreSQL server owned by this process.
pub struct PgServer {
    port: u16,
    child: Mutex<Child>,
    // How the server was started, to start it again on the same data and port (`restart_immediate`).
    launch: Launch,
    // Kept for its Drop (removes the data directory) on servers that are dropped.
    _dir: tempfile::TempDir,
}

/// Directory holding `initdb` and `postgres`: `$PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(dir.into());
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL not found: run `make setup` (installs it) or set PG_BIN")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    candidates
        .pop()
        .context("no /usr/lib/postgresql/*/bin/initdb: run `make setup` or set PG_BIN")
}

impl PgServer {
    /// Initialises and starts a new cluster; returns once it accepts connections.
    pub fn start(durability: Durability) -> anyhow::Result<Self> {
        Self::start_inner(durability, None, &[])
    }

    /// Like [`PgServer::start`], with more server settings (`name=value`, each passed as `-c`), e.g.
    /// `shared_preload_libraries=pg_stat_statements` for a benchmark that reads per-statement times.
    pub fn start_with_settings(durability: Durability, settings: &[&str]) -> anyhow::Result<Self> {
        Self::start_inner(durability, None, settings)
    }

    /// Like [`PgServer::start`], with `ssl=on` and this certificate and key (PEM); clients may still connect
    /// without TLS (the tests check what the product's clients do).
    pub fn start_with_tls(
        durability: Durability,
        cert_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<Self> {
        Self::start_inner(durability, Some((cert_pem, key_pem)), &[])
    }

    fn start_inner(
        durability: Durability,
        tls: Option<(&str, &str)>,
        settings: &[&str],
    ) -> anyhow::Result<Self> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("outbox-pg-").tempdir()?;
        let data = dir.path().join("data");
        // initdb refuses to run as root: run the server as the `postgres` user the package creates.
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")?
                .context("running as root needs a `postgres` user")?;
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        let command = |name: &str| {
            let mut c = Command::new(bin.join(name));
            if let Some((uid, gid)) = run_as {
                std::os::unix::process::CommandExt::uid(&mut c, uid);
                std::os::unix::process::CommandExt::gid(&mut c, gid);
            }
            c
        };
        let out = command("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .context("run initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = crate::free_port();
        std::fs::File::create(dir.path().join("postgres.log"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path().join("postgres.log"), Some(uid), Some(gid))?;
        }
        let mut args: Vec<std::ffi::OsString> = vec!["-D".into(), data.clone().into()];
        args.extend(
            ["-p", &port.to_string(), "-h", "127.0.0.1", "-k"].map(std::ffi::OsString::from),
        );
        args.push(dir.path().into());
        args.extend(
            ["-c", "max_connections=300", "-c", "shared_buffers=256MB"]
                .map(std::ffi::OsString::from),
        );
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let (cert_path, key_path) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_path, cert)?;
            std::fs::write(&key_path, key)?;
            // PostgreSQL refuses a key file others can read, and reads it as the server's user.
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&cert_path, Some(uid), Some(gid))?;
                std::os::unix::fs::chown(&key_path, Some(uid), Some(gid))?;
            }
            args.extend(["-c", "ssl=on", "-c"].map(std::ffi::OsString::from));
            args.push(format!("ssl_cert_file={}", cert_path.display()).into());
            args.push("-c".into());
            args.push(format!("ssl_key_file={}", key_path.display()).into());
        }
        let relaxed: &[&str] = match durability {
            Durability::Throwaway => &[
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ],
            Durability::SurvivesServerCrash => &["fsync=off", "full_page_writes=off"],
            Durability::Durable => &[],
        };
        for setting in relaxed.iter().chain(settings) {
            args.push("-c".into());
            args.push((*setting).into());
        }
        let launch = Launch {
            program: bin.join("postgres"),
            args,
            run_as,
            log: dir.path().join("postgres.log"),
            dir: dir.path().to_path_buf(),
        };
        let child = launch.spawn()?;
        let server = Self {
            port,
            child: Mutex::new(child),
            launch,
            _dir: dir,
        };
        server.wait_ready(Duration::from_secs(30))?;
        Ok(server)
    }

    fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.lock().unwrap().try_wait()? {
                bail!("postgres exited during startup ({status}); see its postgres.log");
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not listen on 127.0.0.1:{} within {timeout:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Crashes the server (SIGQUIT to the postmaster: immediate shutdown, no checkpoint, every connection
    /// dropped at once — what `pg_ctl restart -m immediate` does) and starts it again on the same data and
    /// port; returns once it listens. The restarted server runs crash recovery before it accepts logins.
    pub fn restart_immediate(&self) -> anyhow::Result<()> {
        let mut child = self.child.lock().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGQUIT,
        );
        child.wait().context("wait for postgres to stop")?;
        // The postmaster's children leave with it; the socket lock file is what a restart may trip over.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            *child = self.launch.spawn()?;
            std::thread::sleep(Duration::from_millis(200));
            match child.try_wait()? {
                None => break,
                Some(status) if Instant::now() > deadline => {
                    bail!("postgres did not start again ({status}); see its postgres.log")
                }
                // Still shutting down (the port or lock file is held a moment longer): try again.
                Some(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        drop(child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database with a unique name and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // A fresh connection each time: a pool in a static would outlive the runtime that made it.
        let mut conn = connect_with_retry(&self.url("postgres")).await?;
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        conn.close().await?;
        Ok(self.url(&name))
    }
}

/// The postgres command line of a server, kept to start it again.
struct Launch {
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    run_as: Option<(u32, u32)>,
    log: PathBuf,
    dir: PathBuf,
}

impl Launch {
    fn spawn(&self) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.program);
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        let log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start postgres")?;
        crate::reaper::watch(child.id(), "QUIT", Some(&self.dir));
        Ok(child)
    }
}

async fn connect_with_retry(url: &str) -> anyhow::Result<PgConnection> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match PgConnection::connect(url).await {
            Ok(c) => return Ok(c),
            // The server listens a moment before it accepts logins ("the database system is starting up").
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e).context(format!("connect {url}")),
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let _ = child.wait();
    }
}

/// The server shared by every test in this process (throwaway durability), started on first use.
pub fn shared() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER
        .get_or_init(|| PgServer::start(Durability::Throwaway).expect("start throwaway PostgreSQL"))
}

/// A new database on the shared server.
pub struct TestDb {
    /// Its connection URL.
    pub url: String,
    /// A pool connected to it.
    pub pool: PgPool,
}

/// Creates a fresh database on the shared server and connects a pool to it.
pub async fn fresh_db() -> TestDb {
    let url = shared()
        .create_database()
        .await
        .expect("create test database");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .expect("connect test db");
    TestDb { url, pool }
}
