//! Leader election with a coordination.k8s.io Lease, so two controller
//! replicas never act at once. The holder renews the Lease every third of its
//! duration; a replica takes over only after the holder let it expire.
//! Optimistic concurrency (resourceVersion) makes every take-over a single
//! winner's write.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;

/// Outcome of one attempt to take or keep the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Held,
    HeldByOther,
}

/// Whether `lease` may be taken by `identity` now: free, ours, or expired.
pub fn may_take(lease: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = lease.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = i64::from(lease.lease_duration_seconds.unwrap_or(15));
    match &lease.renew_time {
        Some(MicroTime(renewed)) => *renewed + SignedDuration::from_secs(duration) < now,
        None => true,
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaderElector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// One attempt to take or renew the Lease.
    pub async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(15).max(1);
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Attempt::Held),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldByOther),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                if !may_take(&spec, &self.identity, now) {
                    return Ok(Attempt::HeldByOther);
                }
                let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let mut next = spec.clone();
                next.holder_identity = Some(self.identity.clone());
                next.lease_duration_seconds = Some(seconds);
                next.renew_time = Some(MicroTime(now));
                if !ours {
                    next.acquire_time = Some(MicroTime(now));
                    next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                lease.spec = Some(next);
                // replace carries the resourceVersion we read: a concurrent
                // writer makes this fail with 409 instead of both winning.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(Attempt::Held),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldByOther),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits until this replica holds the Lease, then keeps renewing it in the
    /// background. The returned receiver turns `false` when leadership is lost
    /// (the renewals failed for a whole Lease duration).
    pub async fn lead(self) -> watch::Receiver<bool> {
        let retry = self.duration / 3;
        loop {
            match self.try_acquire().await {
                Ok(Attempt::Held) => break,
                Ok(Attempt::HeldByOther) => {
                    tracing::debug!(lease = %self.name, "another replica leads; waiting")
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot read the Lease"),
            }
            tokio::time::sleep(retry).await;
        }
        tracing::info!(lease = %self.name, identity = %self.identity, "leading");
        let (tx, rx) = watch::channel(true);
        tokio::spawn(async move {
            let mut last_renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(retry).await;
                match self.try_acquire().await {
                    Ok(Attempt::Held) => last_renewed = tokio::time::Instant::now(),
                    Ok(Attempt::HeldByOther) => {
                        tracing::error!(lease = %self.name, "leadership taken by another replica");
                        let _ = tx.send(false);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lease = %self.name, error = %e, "cannot renew the Lease");
                        if last_renewed.elapsed() >= self.duration {
                            let _ = tx.send(false);
                            return;
                        }
                    }
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_replica_is_respected() {
        let now = Timestamp::now();
        assert!(!may_take(&spec("b", 5), "a", now));
        assert!(may_take(&spec("b", 20), "a", now));
        assert!(may_take(&spec("a", 5), "a", now));
        assert!(may_take(&LeaseSpec::default(), "a", now));
    }
}
