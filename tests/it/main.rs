//! The integration tests: one test binary, so the runner's statically linked
//! video stack is linked once. Each module is one area of the product, run
//! against the real test bed (`scripts/infra up`); `common` holds the helpers
//! they share.

mod common;

// The fuzz targets' properties (`fuzz_corpus`) refer to the parsers as
// `crate::camera_url` and so on, as they are named inside the fuzz crate.
use vap_runner::{camera_url, host_policy, messages};

mod chart;
mod cli;
mod controller;
mod controller_admission;
mod controller_chaos;
mod controller_resilience;
mod fuzz_corpus;
mod health;
mod image;
mod kafka_security;
mod local;
mod local_file;
mod local_page;
mod local_recovery;
mod real_node;
mod real_node_life;
mod security;
mod security_local;
mod testbed_kafka;
mod testbed_kube;
mod worker_decoding;
mod worker_files;
mod worker_live;
mod worker_yolo;
