//! The runner's parsers of untrusted input, compiled from the main crate's
//! own source files (without OpenCV, Kafka or Kubernetes), and the
//! properties the fuzz targets check.

#[path = "../../src/camera_url.rs"]
pub mod camera_url;
#[path = "../../src/host_policy.rs"]
pub mod host_policy;
#[path = "../../src/messages.rs"]
pub mod messages;
pub mod properties;
