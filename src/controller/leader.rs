//! Leader election with a coordination.k8s.io Lease, so two controller
//! replicas never act at once, whatever their clocks say.
//!
//! - A standby never compares the holder's `renewTime` with its own clock: it
//!   measures, on its own monotonic clock, how long the Lease has gone
//!   unchanged since it last saw it change, and takes over only after a whole
//!   lease duration of silence.
//! - The holder renews every `retry` and counts its leadership from the start
//!   of its last successful renewal: it stops acting once `renew_deadline`
//!   (well inside the lease duration) has passed without one. A holder paused
//!   (SIGSTOP, a long GC, a hung connection) therefore finds its leadership
//!   already over when it resumes, before the standby can have taken over.
//! - Every Lease call has a timeout (the Lease client's own), shorter than the
//!   renew interval.
//! - On SIGTERM the holder releases the Lease once its in-flight work has
//!   stopped, so a standby takes over at once.
//! - Every change of holder (a take-over of an expired, released or missing
//!   Lease, also by a new process of the same identity) increases
//!   `leaseTransitions`: `<holderIdentity>/<leaseTransitions>` names one term
//!   of one process, the stamp its writes carry ([`super::fencing`]).
//!
//! Optimistic concurrency (resourceVersion) makes every take-over a single
//! winner's write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// Outcome of one attempt to take or keep the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Held,
    HeldByOther,
}

/// Timing of leadership.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// The holder stops acting this long after its last successful renewal.
    pub renew_deadline: Duration,
    /// Pause between attempts and renewals.
    pub retry: Duration,
}

impl Timing {
    /// Renew deadline at two thirds of the lease, retries every sixth.
    pub fn for_lease(lease_duration: Duration) -> Timing {
        Timing {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry: lease_duration / 6,
        }
    }
}

/// What a standby last saw of the Lease, and when (its own clock).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    record: (Option<String>, Option<String>),
    at: Instant,
}

/// Whether a standby may take the Lease: free, ours, or unchanged for a whole
/// lease duration since this replica first saw its current record.
pub fn may_take(
    holder: Option<&str>,
    identity: &str,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> bool {
    let holder = holder.unwrap_or("");
    holder.is_empty() || holder == identity || unchanged_for >= lease_duration
}

/// Tells acting code whether leadership still holds, by the holder's own
/// monotonic clock. Without leader election it always holds.
#[derive(Clone)]
pub struct Leadership {
    inner: Option<Arc<Clock>>,
}

struct Clock {
    /// The stamp of this term (see [`super::fencing`]).
    stamp: String,
    base: Instant,
    /// Nanoseconds after `base` when the last successful renewal started.
    renewed: AtomicU64,
    renew_deadline: Duration,
}

impl Leadership {
    /// Leadership that always holds (leader election off).
    pub fn always() -> Leadership {
        Leadership { inner: None }
    }

    /// The stamp this term's writes carry; `None` without leader election.
    pub fn stamp(&self) -> Option<&str> {
        self.inner.as_ref().map(|c| c.stamp.as_str())
    }

    /// True while the last successful renewal started less than the renew
    /// deadline ago.
    pub fn holds(&self) -> bool {
        match &self.inner {
            None => true,
            Some(c) => {
                let renewed = c.base + Duration::from_nanos(c.renewed.load(Ordering::Acquire));
                renewed.elapsed() < c.renew_deadline
            }
        }
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    seen: Option<Seen>,
    /// `leaseTransitions` of the term this process holds, once it took the
    /// Lease: a Lease showing another holder or another term is lost.
    term: Option<i32>,
}

/// What a replica that held term `term` (if any) makes of a Lease held by
/// `holder` in term `transitions`: whether it is its own current term.
pub fn is_own_term(
    holder: Option<&str>,
    transitions: i32,
    identity: &str,
    term: Option<i32>,
) -> bool {
    holder == Some(identity) && term == Some(transitions)
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Self {
        LeaderElector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            seen: None,
            term: None,
        }
    }

    /// The stamp of the term this process holds, once it took the Lease.
    pub fn stamp(&self) -> Option<String> {
        self.term.map(|t| super::fencing::stamp(&self.identity, t))
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.timing.lease_duration.as_secs())
            .unwrap_or(15)
            .max(1)
    }

    /// One attempt to take or renew the Lease.
    pub async fn try_acquire(&mut self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(self.seconds()),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => {
                        self.term = Some(0);
                        Ok(Attempt::Held)
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldByOther),
                    Err(kube::Error::Api(e)) if e.code == 403 => {
                        // The chart creates the Lease and grants no create.
                        tracing::error!(
                            lease = %self.name,
                            "the Lease does not exist and this account may not create it; the chart \
                             creates it when leaderElection.enabled is true (helm upgrade restores \
                             it), or apply an empty coordination.k8s.io/v1 Lease of this name"
                        );
                        Err(kube::Error::Api(e))
                    }
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let record = (
                    spec.holder_identity.clone(),
                    lease.metadata.resource_version.clone(),
                );
                let seen = match self.seen.take() {
                    Some(s) if s.record == record => s,
                    _ => Seen {
                        record,
                        at: Instant::now(),
                    },
                };
                let unchanged_for = seen.at.elapsed();
                self.seen = Some(seen);
                let holder = spec.holder_identity.as_deref();
                let transitions = spec.lease_transitions.unwrap_or(0);
                let ours = is_own_term(holder, transitions, &self.identity, self.term);
                // A term once lost (another holder, or another process of
                // this identity in a later term) is never taken back.
                if !ours
                    && (self.term.is_some()
                        || !may_take(
                            holder,
                            &self.identity,
                            unchanged_for,
                            self.timing.lease_duration,
                        ))
                {
                    return Ok(Attempt::HeldByOther);
                }
                let mut next = spec.clone();
                next.holder_identity = Some(self.identity.clone());
                next.lease_duration_seconds = Some(self.seconds());
                next.renew_time = Some(MicroTime(now));
                if !ours {
                    next.acquire_time = Some(MicroTime(now));
                    next.lease_transitions = Some(transitions + 1);
                }
                let term = next.lease_transitions.unwrap_or(0);
                lease.spec = Some(next);
                // replace carries the resourceVersion we read: a concurrent
                // writer makes this fail with 409 instead of both winning.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => {
                        self.term = Some(term);
                        Ok(Attempt::Held)
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldByOther),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Gives the Lease up (on shutdown) so a standby takes over at once. A
    /// call that fails (a slow API server, a conflict) is tried again for a
    /// third of the lease's duration; after that the Lease is left to expire,
    /// within the Pod's grace period.
    pub async fn release(&self) {
        let until = std::time::Instant::now() + self.timing.lease_duration / 3;
        loop {
            match self.release_once().await {
                Ok(()) => return,
                Err(e) if std::time::Instant::now() < until => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot release the Lease yet; retrying");
                    tokio::time::sleep(self.timing.retry / 2).await;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot release the Lease; it expires on its own");
                    return;
                }
            }
        }
    }

    /// One attempt of [`LeaderElector::release`]; a Lease that is no longer
    /// this replica's term is left alone.
    async fn release_once(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if !is_own_term(
            spec.holder_identity.as_deref(),
            spec.lease_transitions.unwrap_or(0),
            &self.identity,
            self.term,
        ) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        tracing::info!(lease = %self.name, "Lease released");
        Ok(())
    }

    /// Waits until this replica holds the Lease, then keeps renewing it in the
    /// background until `release` fires (then releases it): the caller fires
    /// it once its in-flight work has stopped. The receiver turns `false`
    /// when leadership is lost; [`Leadership::holds`] turns false at the
    /// renew deadline even before that task notices.
    pub async fn lead(
        mut self,
        mut release: watch::Receiver<bool>,
    ) -> (
        watch::Receiver<bool>,
        Leadership,
        tokio::task::JoinHandle<()>,
    ) {
        let timing = self.timing;
        let started = loop {
            let attempt_start = Instant::now();
            match self.try_acquire().await {
                Ok(Attempt::Held) => break attempt_start,
                Ok(Attempt::HeldByOther) => {
                    tracing::debug!(lease = %self.name, "another replica leads; waiting")
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot read the Lease"),
            }
            tokio::time::sleep(timing.retry).await;
        };
        tracing::info!(lease = %self.name, identity = %self.identity, stamp = %self.stamp().unwrap_or_default(), "leading");
        let clock = Arc::new(Clock {
            stamp: self.stamp().unwrap_or_default(),
            base: started,
            renewed: AtomicU64::new(0),
            renew_deadline: timing.renew_deadline,
        });
        let leadership = Leadership {
            inner: Some(clock.clone()),
        };
        let (tx, rx) = watch::channel(true);
        let keeper = leadership.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(timing.retry) => {}
                    _ = release.changed() => {
                        self.release().await;
                        return;
                    }
                }
                let attempt_start = Instant::now();
                match self.try_acquire().await {
                    Ok(Attempt::Held) if keeper.holds() => {
                        let nanos = attempt_start.duration_since(clock.base).as_nanos();
                        clock
                            .renewed
                            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Release);
                    }
                    Ok(Attempt::Held) => {
                        tracing::error!(lease = %self.name, "the Lease was renewed after the renew deadline; stopping");
                        let _ = tx.send(false);
                        return;
                    }
                    Ok(Attempt::HeldByOther) => {
                        tracing::error!(lease = %self.name, "leadership taken by another replica");
                        let _ = tx.send(false);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lease = %self.name, error = %e, "cannot renew the Lease");
                        if !keeper.holds() {
                            tracing::error!(lease = %self.name, "no renewal within the renew deadline; stopping");
                            let _ = tx.send(false);
                            return;
                        }
                    }
                }
            }
        });
        (rx, leadership, task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_waits_a_whole_lease_of_silence_by_its_own_clock() {
        let lease = Duration::from_secs(15);
        let s = Duration::from_secs;
        assert!(!may_take(Some("b"), "a", s(5), lease));
        assert!(!may_take(Some("b"), "a", s(14), lease));
        assert!(may_take(Some("b"), "a", s(15), lease));
        assert!(may_take(Some("a"), "a", s(0), lease));
        assert!(may_take(None, "a", s(0), lease));
        assert!(may_take(Some(""), "a", s(0), lease));
    }

    #[test]
    fn the_renew_deadline_is_well_inside_the_lease() {
        let t = Timing::for_lease(Duration::from_secs(15));
        assert!(t.renew_deadline + t.retry < t.lease_duration);
        assert!(t.retry * 3 <= t.renew_deadline);
    }

    #[test]
    fn a_term_is_one_holder_in_one_transition() {
        assert!(is_own_term(Some("a"), 2, "a", Some(2)));
        // A later term of the same identity (another process) is not ours,
        // nor is a Lease we never took.
        assert!(!is_own_term(Some("a"), 3, "a", Some(2)));
        assert!(!is_own_term(Some("a"), 2, "a", None));
        assert!(!is_own_term(Some("b"), 2, "a", Some(2)));
        assert!(!is_own_term(None, 2, "a", Some(2)));
    }

    fn renewed_ago(secs: u64) -> Leadership {
        Leadership {
            inner: Some(Arc::new(Clock {
                stamp: "a/1".into(),
                base: Instant::now() - Duration::from_secs(secs),
                renewed: AtomicU64::new(0),
                renew_deadline: Duration::from_secs(10),
            })),
        }
    }

    #[test]
    fn leadership_ends_at_the_renew_deadline_without_renewals() {
        assert!(renewed_ago(0).holds());
        assert!(renewed_ago(9).holds());
        assert!(!renewed_ago(11).holds());
        assert!(Leadership::always().holds());
    }
}
