//! Who may publish. The loop asks its coordinator for a [`Leadership`] before claiming, and stops as soon
//! as the leadership's `lost` token fires. The fencing epoch it carries is checked in every claim
//! transaction, so a deposed holder cannot commit even if it has not noticed yet.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::health::{Health, Role};
use crate::store::Store;

/// The right to publish, until `lost` fires.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// Fencing epoch to check in claim transactions (`None`: no fencing, competing mode).
    pub epoch: Option<i64>,
    /// Cancelled when the right is lost.
    pub lost: CancellationToken,
}

/// Gates the publish loop. Implementations: [`SingleLock`], [`Competing`]; the Kubernetes Lease
/// coordinator plugs in here.
pub trait Coordinator: Send {
    /// Waits until this relay may publish. `Ok(None)` when `shutdown` fired first.
    fn acquire<'a>(
        &'a mut self,
        shutdown: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Option<Leadership>>>;
    /// Gives the right back; called only after the publish loop has stopped.
    fn release(&mut self) -> BoxFuture<'_, ()>;
}

/// `competing`: every relay publishes; SKIP LOCKED shares the work. No fencing, and no ordering across
/// batches of different relays.
#[derive(Debug, Default)]
pub struct Competing;

impl Coordinator for Competing {
    fn acquire<'a>(
        &'a mut self,
        _: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Option<Leadership>>> {
        Box::pin(async {
            Ok(Some(Leadership {
                epoch: None,
                lost: CancellationToken::new(),
            }))
        })
    }
    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// `single`: a PostgreSQL session-level advisory lock per (schema, scope) held on a dedicated
/// connection; the fence epoch is incremented on every acquisition. If the connection dies the lock is
/// gone, so leadership is reported lost at once.
pub struct SingleLock {
    connect: PgConnectOptions,
    pool: PgPool,
    store: Store,
    scope: String,
    holder: String,
    health: Arc<Health>,
    retry: Duration,
    held: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl SingleLock {
    /// A coordinator for `scope`, identifying itself as `holder` in the fence table.
    pub fn new(
        connect: PgConnectOptions,
        pool: PgPool,
        store: Store,
        scope: String,
        holder: String,
        health: Arc<Health>,
    ) -> Self {
        Self {
            connect,
            pool,
            store,
            scope,
            holder,
            health,
            retry: Duration::from_secs(2),
            held: None,
        }
    }

    /// Sets how often a standby retries the lock.
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    fn lock_key(&self) -> String {
        format!("outbox-relay:{}:{}", self.store.schema(), self.scope)
    }

    async fn try_lock(&self) -> anyhow::Result<Result<PgConnection, String>> {
        let mut conn = PgConnection::connect_with(&self.connect).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(self.lock_key())
            .fetch_one(&mut conn)
            .await?;
        if got {
            return Ok(Ok(conn));
        }
        let holder: Option<i32> = sqlx::query_scalar(
            "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
             AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0) LIMIT 1",
        )
        .bind(self.lock_key())
        .fetch_optional(&mut conn)
        .await?;
        let _ = conn.close().await;
        let who = holder
            .map(|p| format!("backend pid {p}"))
            .unwrap_or_else(|| "another session".into());
        Ok(Err(format!(
            "advisory lock `{}` held by {who}",
            self.lock_key()
        )))
    }
}

impl Coordinator for SingleLock {
    fn acquire<'a>(
        &'a mut self,
        shutdown: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Option<Leadership>>> {
        Box::pin(async move {
            let mut announced = None;
            let conn = loop {
                match self.try_lock().await {
                    Ok(Ok(conn)) => break conn,
                    Ok(Err(why)) => {
                        if announced.as_ref() != Some(&why) {
                            tracing::info!("standby: {why}; another relay is publishing, waiting");
                            announced = Some(why.clone());
                        }
                        self.health.set_role(Role::Standby(why));
                    }
                    Err(e) => tracing::warn!("standby: cannot try the advisory lock: {e:#}"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(self.retry) => {}
                }
            };
            let epoch = self
                .store
                .take_fence(
                    &self.pool,
                    &self.scope,
                    &self.holder,
                    None,
                    Duration::from_secs(30),
                )
                .await?
                .expect("an increment always takes the fence");
            tracing::info!(
                epoch,
                "acquired advisory lock `{}`; publishing",
                self.lock_key()
            );
            let lost = CancellationToken::new();
            let stop = CancellationToken::new();
            let keeper = tokio::spawn(keep_lock(conn, lost.clone(), stop.clone()));
            self.held = Some((stop, keeper));
            Ok(Some(Leadership {
                epoch: Some(epoch),
                lost,
            }))
        })
    }

    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some((stop, keeper)) = self.held.take() {
                stop.cancel();
                let _ = keeper.await;
            }
        })
    }
}

/// Pings the lock connection; a failed ping means the session (and its lock) may be gone.
async fn keep_lock(mut conn: PgConnection, lost: CancellationToken, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut conn).await;
                let _ = conn.close().await;
                return;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let ping = tokio::time::timeout(Duration::from_secs(5), conn.ping()).await;
                if !matches!(ping, Ok(Ok(()))) {
                    tracing::error!("lost the advisory lock connection; stopping publishing");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
