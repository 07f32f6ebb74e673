//! Fenced writes: every object the leader creates or changes carries its
//! stamp, `<holderIdentity>/<leaseTransitions>` of the leader Lease as it took
//! it, and the chart's ValidatingAdmissionPolicy (`fencing.yaml`, with the
//! Lease as its parameter) refuses a write whose stamp is not the current
//! holder's. A leader that was paused or cut off past its Lease therefore
//! changes nothing once a standby has taken over, whatever its requests were
//! doing meanwhile.
//!
//! Pods, Secrets and Scenarios carry the stamp as the annotation
//! [`ANNOTATION_LEADER`]; a Scenario's status carries it as `status.writer`
//! (a status write does not change annotations).

use std::collections::BTreeMap;

use kube::api::ObjectMeta;

/// The annotation holding the writer's stamp.
pub const ANNOTATION_LEADER: &str = "runner.vap.io/leader";

/// Words the fencing policy's refusal always contains (its message says
/// which stamp was refused and who holds the Lease); [`super::refusal`]
/// tells the refusal by them.
pub const REFUSAL_MARKER: &str = "not the current holder of the leader Lease";

/// How the fencing policy's name ends (`<fullname>.<namespace>` before it):
/// a refusal naming it that has not [`REFUSAL_MARKER`] (the policy could not
/// read the Lease, for one) is fenced all the same.
pub const POLICY_SUFFIX: &str = ".leader-writes.runner.vap.io";

/// The stamp of the holder `identity` in its `transitions`-th term.
pub fn stamp(identity: &str, transitions: i32) -> String {
    format!("{identity}/{transitions}")
}

/// Sets the stamp annotation on `meta` (nothing without a stamp: leader
/// election off, where no fencing policy is installed).
pub fn stamp_meta(meta: &mut ObjectMeta, stamp: Option<&str>) {
    let Some(stamp) = stamp else {
        return;
    };
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_LEADER.to_string(), stamp.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_names_holder_and_term_and_goes_on_the_object() {
        assert_eq!(stamp("replica-a", 3), "replica-a/3");
        let mut meta = ObjectMeta::default();
        stamp_meta(&mut meta, None);
        assert!(meta.annotations.is_none());
        stamp_meta(&mut meta, Some("replica-a/3"));
        assert_eq!(meta.annotations.unwrap()[ANNOTATION_LEADER], "replica-a/3");
    }
}
