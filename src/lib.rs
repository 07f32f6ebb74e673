//! vap-runner: a Kubernetes operator that runs video-inference workers on camera
//! streams. The same binary is the controller, the worker and the local
//! supervisor; see `cli` for the entry points.

pub mod backoff;
pub mod build_info;
pub mod camera_url;
pub mod cli;
pub mod config;
pub mod controller;
pub mod detector;
pub mod heartbeat;
pub mod host_policy;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod local;
pub mod messages;
pub mod sampler;
pub mod scenario;
pub mod settings_doc;
pub mod signals;
pub mod telemetry;
pub mod watchdog;
pub mod worker;
