//! The election itself: a pure state machine fed with what the Lease read returned and what a write
//! answered, deciding the next write and whether this candidate may lead right now. No IO, no clock of its
//! own (every call takes `now`), so the rules below are unit-tested and simulated over thousands of rounds:
//! - a candidate takes over only after it has *observed* no change of the Lease for a full lease duration
//!   on its own monotonic clock (the `renewTime` written by another machine's clock is never trusted);
//! - every write is a compare-and-swap on `resourceVersion`; a conflict means "not leader";
//! - the holder may lead only until `renew_deadline` after the send time of its last successful renew,
//!   which is earlier than anyone else may acquire (`lease_duration` > `renew_deadline`);
//! - the epoch is `leaseTransitions` after acquisition, strictly increasing per takeover, so a user can fence
//!   with it (the relay writes it to `outbox.fence`; a paused-then-resumed holder cannot commit).

use std::time::{Duration, Instant};

/// The three client-go timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How long a Lease stays valid without renewal (default 15 s).
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renew (default 10 s).
    pub renew_deadline: Duration,
    /// Pause between attempts (default 2 s).
    pub retry_period: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Timings {
    /// Checks lease duration > renew deadline > retry period > 0.
    pub fn validate(&self) -> Result<(), String> {
        if self.retry_period.is_zero() {
            return Err("retry period must be positive".into());
        }
        if self.renew_deadline <= self.retry_period {
            return Err("renew deadline must exceed the retry period".into());
        }
        if self.lease_duration <= self.renew_deadline {
            return Err("lease duration must exceed the renew deadline".into());
        }
        Ok(())
    }
}

/// What the election needs from a Lease object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `spec.holderIdentity` (empty or absent: released).
    pub holder: Option<String>,
    /// `spec.leaseTransitions`.
    pub transitions: i64,
    /// `metadata.resourceVersion`: the compare-and-swap token.
    pub resource_version: String,
}

/// The result of reading the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// No Lease object.
    Missing,
    /// The current object.
    Found(LeaseRecord),
    /// The API server did not answer usefully.
    Error(String),
}

/// The write the election asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Create the Lease naming this candidate (fails with a conflict if someone was faster).
    Create {
        /// `leaseTransitions` to write.
        transitions: i64,
    },
    /// Update the Lease naming this candidate, only if it still has `resource_version`.
    Update {
        /// Expected `resourceVersion`.
        resource_version: String,
        /// `leaseTransitions` to write (incremented on a takeover).
        transitions: i64,
        /// A takeover (true) or a renewal (false): a takeover also sets `acquireTime`.
        takeover: bool,
    },
}

/// What to do after a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this write, remember when it was sent, and report the result with [`Elector::written`].
    Write(Write),
    /// Nothing to write; try again after the retry period. The text says why (for logs and readiness).
    Wait(String),
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Accepted; the new `resourceVersion`.
    Ok(String),
    /// 409: someone else wrote first.
    Conflict,
    /// Any other failure (timeout, 5xx): unknown whether it applied.
    Error(String),
}

/// The election state of one candidate.
#[derive(Debug, Clone)]
pub struct Elector {
    identity: String,
    timings: Timings,
    /// The last distinct Lease version seen and when (our clock) it was first seen.
    observed: Option<(String, Instant)>,
    /// Leading: epoch and the send time of the last successful write.
    leading: Option<(i64, Instant)>,
    /// The write in flight and its send time.
    pending: Option<(Write, Instant)>,
    /// Every epoch this candidate takes is above this (the fence table's epoch, when it is ahead of the Lease).
    floor: i64,
}

impl Elector {
    /// A candidate named `identity`.
    pub fn new(identity: impl Into<String>, timings: Timings) -> Self {
        Self {
            identity: identity.into(),
            timings,
            observed: None,
            leading: None,
            pending: None,
            floor: -1,
        }
    }

    /// Makes every later acquisition take an epoch above `epoch`. Used when the fence table is ahead of the
    /// Lease (the Lease was recreated, or the outbox was fenced by another coordination mode before): epochs
    /// still come only from compare-and-swap writes, so they stay unique.
    pub fn raise_epoch_floor(&mut self, epoch: i64) {
        self.floor = self.floor.max(epoch);
    }

    fn next_epoch(&self, transitions: i64) -> i64 {
        (transitions + 1).max(self.floor + 1)
    }

    /// When leading must stop unless a renewal succeeds first (`None`: not leading).
    pub fn lead_deadline(&self) -> Option<Instant> {
        self.leading
            .map(|(_, renewed)| renewed + self.timings.renew_deadline)
    }

    /// The timings this candidate runs with.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// This candidate's name.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The epoch this candidate may lead with at `now`, if any: leading, and the last successful
    /// renew was sent less than the renew deadline ago.
    pub fn may_lead(&self, now: Instant) -> Option<i64> {
        let (epoch, renewed) = self.leading?;
        (now.saturating_duration_since(renewed) < self.timings.renew_deadline).then_some(epoch)
    }

    /// Decides what to do after reading the Lease at `now`.
    pub fn observe(&mut self, now: Instant, read: &Read) -> Step {
        self.expire(now);
        let record = match read {
            Read::Error(e) => return Step::Wait(format!("cannot read the Lease: {e}")),
            Read::Missing => {
                let transitions = self.next_epoch(-1);
                return self.send(now, Write::Create { transitions });
            }
            Read::Found(r) => r,
        };
        match &self.observed {
            Some((rv, _)) if *rv == record.resource_version => {}
            _ => self.observed = Some((record.resource_version.clone(), now)),
        }
        let seen_at = self.observed.as_ref().map(|o| o.1).unwrap_or(now);
        let holder = record.holder.as_deref().filter(|h| !h.is_empty());
        match holder {
            Some(h) if h == self.identity => {
                if self.leading.is_none() {
                    // Named holder but not leading (a restart with the same identity, or an unknown write
                    // outcome): take it over as a new epoch, never reuse one.
                    return self.send(
                        now,
                        Write::Update {
                            resource_version: record.resource_version.clone(),
                            transitions: self.next_epoch(record.transitions),
                            takeover: true,
                        },
                    );
                }
                self.send(
                    now,
                    Write::Update {
                        resource_version: record.resource_version.clone(),
                        transitions: record.transitions,
                        takeover: false,
                    },
                )
            }
            Some(h) => {
                self.leading = None;
                let unchanged_for = now.saturating_duration_since(seen_at);
                if unchanged_for < self.timings.lease_duration {
                    return Step::Wait(format!(
                        "lease held by {h} (unchanged for {:.1}s of {:.0}s)",
                        unchanged_for.as_secs_f64(),
                        self.timings.lease_duration.as_secs_f64()
                    ));
                }
                self.send(
                    now,
                    Write::Update {
                        resource_version: record.resource_version.clone(),
                        transitions: self.next_epoch(record.transitions),
                        takeover: true,
                    },
                )
            }
            // Released: anyone may take it at once.
            None => self.send(
                now,
                Write::Update {
                    resource_version: record.resource_version.clone(),
                    transitions: self.next_epoch(record.transitions),
                    takeover: true,
                },
            ),
        }
    }

    fn send(&mut self, now: Instant, w: Write) -> Step {
        self.pending = Some((w.clone(), now));
        Step::Write(w)
    }

    /// Reports the outcome of the last write.
    pub fn written(&mut self, result: &Written) {
        let Some((w, sent)) = self.pending.take() else {
            return;
        };
        match result {
            Written::Ok(rv) => {
                let transitions = match w {
                    Write::Create { transitions } | Write::Update { transitions, .. } => {
                        transitions
                    }
                };
                self.leading = Some((transitions, sent));
                self.observed = Some((rv.clone(), sent));
            }
            // Someone else holds it (or our earlier write landed and changed the version): not leader
            // until a read says otherwise. A renewal that failed leaves the deadline running.
            Written::Conflict => self.leading = None,
            Written::Error(_) => {}
        }
    }

    /// Drops leadership once the renew deadline has passed.
    fn expire(&mut self, now: Instant) {
        if self.leading.is_some() && self.may_lead(now).is_none() {
            self.leading = None;
        }
    }

    /// Gives up leadership (before releasing the Lease: the loop has stopped).
    pub fn step_down(&mut self) {
        self.leading = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(holder: &str, transitions: i64, rv: &str) -> Read {
        Read::Found(LeaseRecord {
            holder: (!holder.is_empty()).then(|| holder.to_owned()),
            transitions,
            resource_version: rv.into(),
        })
    }

    #[test]
    fn timings_must_nest() {
        assert!(Timings::default().validate().is_ok());
        let t = |l, r, p| Timings {
            lease_duration: Duration::from_secs(l),
            renew_deadline: Duration::from_secs(r),
            retry_period: Duration::from_secs(p),
        };
        assert!(t(10, 10, 2)
            .validate()
            .unwrap_err()
            .contains("lease duration"));
        assert!(t(15, 2, 2)
            .validate()
            .unwrap_err()
            .contains("renew deadline"));
        assert!(t(15, 10, 0).validate().is_err());
    }

    #[test]
    fn a_missing_lease_is_created_and_renewals_keep_the_epoch() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", Timings::default());
        assert_eq!(
            e.observe(t0, &Read::Missing),
            Step::Write(Write::Create { transitions: 0 })
        );
        e.written(&Written::Ok("1".into()));
        assert_eq!(e.may_lead(t0), Some(0));
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            e.observe(t1, &rec("a", 0, "1")),
            Step::Write(Write::Update {
                resource_version: "1".into(),
                transitions: 0,
                takeover: false
            })
        );
        e.written(&Written::Ok("2".into()));
        assert_eq!(e.may_lead(t1 + Duration::from_millis(9_999)), Some(0));
        assert_eq!(
            e.may_lead(t1 + Duration::from_secs(10)),
            None,
            "renew deadline"
        );
    }

    #[test]
    fn a_candidate_waits_a_full_lease_duration_of_its_own_observation() {
        let t0 = Instant::now();
        let mut b = Elector::new("b", Timings::default());
        assert!(
            matches!(b.observe(t0, &rec("a", 3, "7")), Step::Wait(w) if w.contains("held by a"))
        );
        // The holder renews (new version): the clock restarts.
        let t1 = t0 + Duration::from_secs(10);
        assert!(matches!(b.observe(t1, &rec("a", 3, "8")), Step::Wait(_)));
        assert!(matches!(
            b.observe(t1 + Duration::from_millis(14_999), &rec("a", 3, "8")),
            Step::Wait(_)
        ));
        assert_eq!(
            b.observe(t1 + Duration::from_secs(15), &rec("a", 3, "8")),
            Step::Write(Write::Update {
                resource_version: "8".into(),
                transitions: 4,
                takeover: true
            })
        );
        b.written(&Written::Ok("9".into()));
        assert_eq!(b.may_lead(t1 + Duration::from_secs(15)), Some(4));
    }

    #[test]
    fn conflicts_and_errors_never_extend_leadership() {
        let t0 = Instant::now();
        let mut a = Elector::new("a", Timings::default());
        a.observe(t0, &Read::Missing);
        a.written(&Written::Ok("1".into()));
        // Renewals fail with errors: publishing stops at the deadline counted from the last success.
        for s in [2, 4, 6, 8] {
            let now = t0 + Duration::from_secs(s);
            a.observe(now, &rec("a", 0, "1"));
            a.written(&Written::Error("timeout".into()));
        }
        assert_eq!(a.may_lead(t0 + Duration::from_millis(9_999)), Some(0));
        assert_eq!(a.may_lead(t0 + Duration::from_secs(10)), None);
        // A read error after the deadline does not bring it back either.
        assert!(matches!(
            a.observe(t0 + Duration::from_secs(11), &Read::Error("503".into())),
            Step::Wait(_)
        ));
        assert_eq!(a.may_lead(t0 + Duration::from_secs(11)), None);
        // A conflict ends leadership at once.
        let mut b = Elector::new("b", Timings::default());
        b.observe(t0, &Read::Missing);
        b.written(&Written::Ok("1".into()));
        b.observe(t0 + Duration::from_secs(2), &rec("b", 0, "1"));
        b.written(&Written::Conflict);
        assert_eq!(b.may_lead(t0 + Duration::from_secs(2)), None);
    }

    #[test]
    fn a_restarted_holder_with_the_same_name_takes_a_new_epoch() {
        let t0 = Instant::now();
        let mut a = Elector::new("a", Timings::default());
        assert_eq!(
            a.observe(t0, &rec("a", 5, "40")),
            Step::Write(Write::Update {
                resource_version: "40".into(),
                transitions: 6,
                takeover: true
            })
        );
    }

    #[test]
    fn an_epoch_floor_lifts_creations_and_takeovers_above_the_fence() {
        let t0 = Instant::now();
        let mut a = Elector::new("a", Timings::default());
        a.raise_epoch_floor(41);
        a.raise_epoch_floor(7); // never lowers
        assert_eq!(
            a.observe(t0, &Read::Missing),
            Step::Write(Write::Create { transitions: 42 })
        );
        let mut b = Elector::new("b", Timings::default());
        b.raise_epoch_floor(41);
        assert_eq!(
            b.observe(t0, &rec("", 3, "9")),
            Step::Write(Write::Update {
                resource_version: "9".into(),
                transitions: 42,
                takeover: true
            })
        );
        // Above the floor the Lease's own count wins.
        let mut c = Elector::new("c", Timings::default());
        c.raise_epoch_floor(2);
        assert_eq!(
            c.observe(t0, &rec("", 50, "9")),
            Step::Write(Write::Update {
                resource_version: "9".into(),
                transitions: 51,
                takeover: true
            })
        );
        assert_eq!(c.lead_deadline(), None);
        c.written(&Written::Ok("10".into()));
        assert_eq!(c.lead_deadline(), Some(t0 + Duration::from_secs(10)));
    }

    /// A simulated API server, fence table and two or three candidates with skewed clocks, pauses,
    /// API errors and candidates cut off from the API server while still running. Checks: never two publishers at the same moment, every epoch belongs to one holder,
    /// and no commit with an epoch older than the fence's.
    #[test]
    fn simulated_clusters_never_have_two_publishers_or_stale_commits() {
        for seed in 0..100u64 {
            simulate(seed);
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            // xorshift64*: deterministic per seed, no dependency.
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    struct Candidate {
        e: Elector,
        rate: f64,
        local: Duration,
        next_try: Duration,
        paused_until: Duration,
        cut_off_until: Duration,
    }

    fn simulate(seed: u64) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let base = Instant::now();
        let t = Timings::default();
        let mut lease: Option<(Option<String>, i64, u64)> = None;
        let mut rv = 0u64;
        let mut fence: i64 = -1;
        let mut fence_owner: std::collections::HashMap<i64, String> = Default::default();
        let mut last_commit_epoch = -1i64;
        let n = 2 + (seed % 2) as usize;
        let mut cs: Vec<Candidate> = (0..n)
            .map(|i| Candidate {
                e: Elector::new(format!("r{i}"), t),
                // Clock rates differ by up to ±10 % (real clocks drift by parts per million; this also
                // stands for scheduling jitter). The 5 s between renew deadline and lease duration covers it.
                rate: 0.9 + 0.2 * rng.next(),
                local: Duration::ZERO,
                next_try: Duration::ZERO,
                paused_until: Duration::ZERO,
                cut_off_until: Duration::ZERO,
            })
            .collect();
        let dt = Duration::from_millis(10);
        let mut real = Duration::ZERO;
        let mut takeovers = 0;
        while real < Duration::from_secs(600) {
            real += dt;
            let mut publishing = vec![];
            for (i, c) in cs.iter_mut().enumerate() {
                // Monotonic clocks keep running during a pause.
                c.local += dt.mul_f64(c.rate);
                if real < c.paused_until {
                    continue;
                }
                if rng.next() < 0.0005 {
                    // A stop-the-world pause of up to 30 s (longer than a lease).
                    c.paused_until = real + Duration::from_secs_f64(30.0 * rng.next());
                    continue;
                }
                if rng.next() < 0.0005 {
                    // Cut off from the API server (alive, still able to publish) for up to 40 s.
                    c.cut_off_until = real + Duration::from_secs_f64(40.0 * rng.next());
                }
                let cut_off = real < c.cut_off_until;
                let now = base + c.local;
                if c.local >= c.next_try {
                    c.next_try = c.local + t.retry_period;
                    let read = if cut_off || rng.next() < 0.1 {
                        Read::Error("injected".into())
                    } else {
                        match &lease {
                            None => Read::Missing,
                            Some((h, tr, v)) => Read::Found(LeaseRecord {
                                holder: h.clone(),
                                transitions: *tr,
                                resource_version: v.to_string(),
                            }),
                        }
                    };
                    if let Step::Write(w) = c.e.observe(now, &read) {
                        let result = if cut_off || rng.next() < 0.1 {
                            Written::Error("injected".into())
                        } else {
                            let ok = match (&w, &lease) {
                                (Write::Create { .. }, None) => true,
                                (
                                    Write::Update {
                                        resource_version, ..
                                    },
                                    Some((_, _, v)),
                                ) => *resource_version == v.to_string(),
                                _ => false,
                            };
                            if ok {
                                let tr = match &w {
                                    Write::Create { transitions }
                                    | Write::Update { transitions, .. } => *transitions,
                                };
                                rv += 1;
                                lease = Some((Some(c.e.identity().to_owned()), tr, rv));
                                Written::Ok(rv.to_string())
                            } else {
                                Written::Conflict
                            }
                        };
                        let was_leading = c.e.may_lead(now).is_some();
                        c.e.written(&result);
                        if let (Some(epoch), false) = (c.e.may_lead(now), was_leading) {
                            // Acquisition: the relay writes its epoch to the fence.
                            takeovers += 1;
                            if let Some(owner) = fence_owner.get(&epoch) {
                                assert_eq!(
                                    owner,
                                    c.e.identity(),
                                    "seed {seed}: epoch {epoch} reused"
                                );
                            }
                            fence_owner.insert(epoch, c.e.identity().to_owned());
                            fence = fence.max(epoch);
                        }
                    }
                }
                if let Some(epoch) = c.e.may_lead(now) {
                    publishing.push(i);
                    // A claim transaction commits only with the fence's epoch.
                    if epoch == fence {
                        assert!(
                            epoch >= last_commit_epoch,
                            "seed {seed}: stale epoch committed"
                        );
                        last_commit_epoch = epoch;
                    }
                }
            }
            assert!(
                publishing.len() <= 1,
                "seed {seed}: {publishing:?} publish together at {real:?}"
            );
        }
        assert!(
            takeovers >= 2,
            "seed {seed}: the simulation exercised no takeover"
        );
    }
}
