//! A candidate over time: election rounds every retry period until it may lead, then a keeper task that
//! renews and fires `lost` the instant the renew deadline passes, whatever the API server does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::client::LeaseClient;
use crate::elector::{Elector, Step, Written};

/// What the election tells the program using it, for its metrics and health. Every method has an empty
/// default.
pub trait Observer: Send + Sync + 'static {
    /// A Lease write finished: `outcome` is `ok`, `conflict` or `error`.
    fn lease_written(&self, _outcome: &'static str, _took: Duration) {}
    /// The keeper started: this candidate leads with `epoch`.
    fn leading(&self, _epoch: i64) {}
    /// Leadership ended: lost, or given back with [`Held::release`].
    fn stopped_leading(&self) {}
    /// Not leading; `why` says what it waits for (the holder, an unreadable Lease, ...).
    fn standby(&self, _why: &str) {}
}

/// An [`Observer`] that ignores everything.
#[derive(Debug, Default)]
pub struct Unobserved;

impl Observer for Unobserved {}

/// One candidate for one Lease: the pure [`Elector`] and the client doing its IO.
pub struct Candidate {
    client: LeaseClient,
    elector: Elector,
    observer: Arc<dyn Observer>,
}

impl Candidate {
    /// A candidate writing as `client`'s identity, reporting to `observer`.
    pub fn new(client: LeaseClient, observer: Arc<dyn Observer>) -> Self {
        Self {
            elector: Elector::new(client.identity(), client.timings()),
            client,
            observer,
        }
    }

    /// The Lease client.
    pub fn client(&self) -> &LeaseClient {
        &self.client
    }

    /// The election state, for callers that step down or raise the epoch floor after their own checks
    /// (the relay's fence).
    pub fn elector_mut(&mut self) -> &mut Elector {
        &mut self.elector
    }

    /// The epoch, if this candidate may lead now.
    pub fn may_lead(&self) -> Option<i64> {
        self.elector.may_lead(Instant::now())
    }

    /// One election round: read, decide, write. Returns why it waits, if it does.
    pub async fn round(&mut self) -> Option<String> {
        round(&self.client, &mut self.elector, self.observer.as_ref()).await
    }

    /// Runs a round every retry period until this candidate may lead; returns the epoch, or `None` when
    /// `shutdown` fired first. While waiting it tells the observer why, and logs each new reason once.
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> Option<i64> {
        let mut announced = None;
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let waiting = self.round().await;
            if let Some(epoch) = self.may_lead() {
                return Some(epoch);
            }
            let why = waiting.unwrap_or_else(|| "acquiring the Lease".into());
            // The "unchanged for" counter changes every round: log only a new reason.
            let reason = why.split(" (").next().unwrap_or_default().to_owned();
            if announced.as_ref() != Some(&reason) {
                tracing::info!(lease = %self.client.name(), "standby: {why}");
                announced = Some(reason);
            }
            self.observer.standby(&why);
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(self.client.timings().retry_period) => {}
            }
        }
    }

    /// Starts leading with `epoch` (from [`Candidate::acquire`] or [`Candidate::may_lead`]): a keeper task
    /// renews every retry period and fires [`Held::lost`] when the renew deadline passes without a
    /// successful renewal or another holder wrote the Lease.
    pub fn keep(self, epoch: i64) -> Held {
        self.observer.leading(epoch);
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let (client, observer) = (self.client.clone(), self.observer.clone());
        let task = tokio::spawn(keep(self, lost.clone(), stop.clone()));
        Held {
            epoch,
            lost,
            stop,
            task,
            client,
            observer,
        }
    }
}

/// Leadership being kept by a background task.
pub struct Held {
    epoch: i64,
    lost: CancellationToken,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Candidate>,
    client: LeaseClient,
    observer: Arc<dyn Observer>,
}

impl Held {
    /// The epoch (`leaseTransitions`) of this leadership.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Fires when leadership is lost; the holder must stop leading at once.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing and clears the holder if it is still this candidate, so a standby takes over at its
    /// next attempt instead of after a lease duration. Call it only once the leader's work has stopped.
    /// Returns the candidate, to stand again.
    pub async fn release(self) -> Candidate {
        self.stop.cancel();
        let mut candidate = match self.task.await {
            Ok(c) => c,
            Err(_) => Candidate::new(self.client.clone(), self.observer.clone()),
        };
        candidate.elector.step_down();
        self.observer.stopped_leading();
        self.client.release().await;
        candidate
    }
}

async fn round(
    client: &LeaseClient,
    elector: &mut Elector,
    observer: &dyn Observer,
) -> Option<String> {
    let read = client.read().await;
    match elector.observe(Instant::now(), &read) {
        Step::Wait(why) => Some(why),
        Step::Write(w) => {
            let started = Instant::now();
            let result = client.write(&w).await;
            let outcome = match &result {
                Written::Ok(_) => "ok",
                Written::Conflict => "conflict",
                Written::Error(e) => {
                    tracing::warn!(lease = %client.name(), "Lease write failed: {e}");
                    "error"
                }
            };
            observer.lease_written(outcome, started.elapsed());
            elector.written(&result);
            None
        }
    }
}

/// Renews every retry period until stopped or lost; returns the candidate when stopped.
async fn keep(mut c: Candidate, lost: CancellationToken, stop: CancellationToken) -> Candidate {
    let retry = c.client.timings().retry_period;
    loop {
        let Some(deadline) = c.elector.lead_deadline() else {
            tracing::error!(lease = %c.client.name(), "lost the Lease (another holder wrote it)");
            break;
        };
        if c.may_lead().is_none() {
            tracing::error!(lease = %c.client.name(), "renew deadline passed without a renewal");
            break;
        }
        let stopped = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep_until(deadline.into()) => false,
            _ = async {
                tokio::time::sleep(retry).await;
                round(&c.client, &mut c.elector, c.observer.as_ref()).await;
            } => false,
        };
        if stopped {
            return c;
        }
    }
    c.observer.stopped_leading();
    lost.cancel();
    stop.cancelled().await;
    c
}
