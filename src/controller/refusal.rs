//! What an API server's refusal means, decided once for ingest (writing
//! Scenarios) and reconcile (creating worker Pods), so that both treat the
//! same answer the same way.

/// The kinds of refusal, by what helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The object itself is refused (invalid, or denied by an admission
    /// policy or webhook): sending it again changes nothing.
    Invalid,
    /// A ResourceQuota of the namespace is used up: the object is fine, and
    /// may be accepted once something else is gone.
    Quota,
    /// The runner's account may not do this (RBAC): a setting to fix, after
    /// which the same request succeeds. Retried, never taken as a verdict on
    /// the scenario.
    Unauthorized,
    /// The fencing policy refused a write of a replica that no longer holds
    /// the leader Lease ([`super::fencing`]): never a verdict on the object;
    /// that replica stops acting.
    Fenced,
    /// Anything else (unreachable, timeouts, 5xx, 429, conflicts): retried.
    Retry,
}

/// Sorts an API error. A quota refusal and an RBAC denial are both `403
/// Forbidden` and are told apart by the API server's wording ("exceeded
/// quota", "cannot <verb> resource"); any other 403 is an admission denial.
pub fn classify(e: &kube::Error) -> Refusal {
    let kube::Error::Api(e) = e else {
        return Refusal::Retry;
    };
    match e.code {
        403 | 422 if is_fenced(&e.message) => Refusal::Fenced,
        400 | 422 => Refusal::Invalid,
        403 if e.message.contains("exceeded quota") => Refusal::Quota,
        403 if is_rbac_denial(&e.message) => Refusal::Unauthorized,
        403 => Refusal::Invalid,
        _ => Refusal::Retry,
    }
}

/// The fencing policy's refusal: its words, or its name (it names itself when
/// it cannot read the Lease: "no params found").
fn is_fenced(message: &str) -> bool {
    use super::fencing::{POLICY_SUFFIX, REFUSAL_MARKER};
    message.contains(REFUSAL_MARKER) || message.contains(&format!("{POLICY_SUFFIX}' denied"))
}

/// RBAC's wording: `pods is forbidden: User "system:serviceaccount:ns:name"
/// cannot create resource "pods" in API group "" in the namespace "ns"`.
fn is_rbac_denial(message: &str) -> bool {
    message.contains("User \"") && message.contains(" cannot ") && message.contains("resource \"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, reason)
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn each_answer_is_sorted_by_what_helps() {
        let rows = [
            (
                api(
                    403,
                    "Forbidden",
                    "pods \"worker-1\" is forbidden: exceeded quota: pods, requested: pods=1, used: pods=1, limited: pods=1",
                ),
                Refusal::Quota,
            ),
            (
                api(
                    403,
                    "Forbidden",
                    "scenarios.runner.vap.io is forbidden: User \"system:serviceaccount:vap:runner\" cannot create resource \"scenarios\" in API group \"runner.vap.io\" in the namespace \"vap\"",
                ),
                Refusal::Unauthorized,
            ),
            (
                api(
                    403,
                    "Forbidden",
                    "pods \"worker-1\" is forbidden: ValidatingAdmissionPolicy 'vap-worker-pods' with binding 'vap-worker-pods' denied request: a worker Pod runs the runner's image",
                ),
                Refusal::Invalid,
            ),
            (
                api(
                    422,
                    "Invalid",
                    "Scenario.runner.vap.io \"scn-1\" is invalid: spec.fps: Invalid value",
                ),
                Refusal::Invalid,
            ),
            (
                api(
                    403,
                    "Forbidden",
                    &format!(
                        "pods \"worker-1\" is forbidden: ValidatingAdmissionPolicy 'vap-leader-writes' with binding 'vap-leader-writes' denied request: the write is stamped a/1; {} (b/2)",
                        super::super::fencing::REFUSAL_MARKER
                    ),
                ),
                Refusal::Fenced,
            ),
            (
                api(
                    422,
                    "Invalid",
                    "pods \"worker-1\" is forbidden: ValidatingAdmissionPolicy 'vap.video.leader-writes.runner.vap.io' with binding 'vap.video.leader-writes.runner.vap.io' denied request: failed to configure binding: no params found for policy binding with `Deny` parameterNotFoundAction",
                ),
                Refusal::Fenced,
            ),
            (
                api(400, "BadRequest", "the body cannot be decoded"),
                Refusal::Invalid,
            ),
            (
                api(500, "InternalError", "etcdserver: request timed out"),
                Refusal::Retry,
            ),
            (
                api(429, "TooManyRequests", "too many requests"),
                Refusal::Retry,
            ),
            (
                api(409, "Conflict", "the object has been modified"),
                Refusal::Retry,
            ),
        ];
        for (error, expected) in rows {
            assert_eq!(classify(&error), expected, "{error}");
        }
    }
}
