//! A Kafka broker of one test's own with the secured listeners
//! (scripts/infra.d/kafka with `VAP_KAFKA_SECURE=1`, its own run dir and
//! ports): SASL_SSL, SSL with client certificates, SASL_PLAINTEXT, a CA the
//! bed generates, SCRAM users and ACLs. The PLAINTEXT listener is a super
//! user: the test's own clients produce commands and read results there.
//! Brought down when dropped, also on panic.

use std::path::PathBuf;
use std::process::{Output, Stdio};

use super::free_ports;

pub struct SecureKafka {
    run: tempfile::TempDir,
    ports: [u16; 5],
    /// `name=password` of every SASL user the broker knows.
    users: Vec<(String, String)>,
    /// The JWKS whose tokens the SASL listeners accept (OAUTHBEARER), if any.
    oauth_jwks: Option<String>,
}

impl SecureKafka {
    /// Starts a broker with SASL users `users` (name, password).
    pub fn start(users: &[(&str, &str)]) -> SecureKafka {
        Self::start_with(users, None)
    }

    /// Starts a broker whose SASL listeners also take OAUTHBEARER tokens
    /// signed by a key of `jwks_url` for the audience [`super::oidc::AUDIENCE`].
    pub fn start_with_oauth(users: &[(&str, &str)], jwks_url: &str) -> SecureKafka {
        Self::start_with(users, Some(jwks_url.to_string()))
    }

    fn start_with(users: &[(&str, &str)], oauth_jwks: Option<String>) -> SecureKafka {
        let kafka = SecureKafka {
            run: tempfile::tempdir().expect("temp dir"),
            ports: free_ports::<5>(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            oauth_jwks,
        };
        let out = kafka.script(&["up"]);
        assert!(
            out.status.success(),
            "Kafka is missing: the secured broker did not start on {}: {}",
            kafka.bootstrap(),
            String::from_utf8_lossy(&out.stderr)
        );
        kafka
    }

    fn script(&self, args: &[&str]) -> Output {
        let users: Vec<String> = self.users.iter().map(|(u, p)| format!("{u}={p}")).collect();
        let [port, controller, sasl_ssl, ssl, sasl_plaintext] = self.ports;
        let mut command = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/infra.d/kafka"
        ));
        if let Some(jwks) = &self.oauth_jwks {
            command
                .env("VAP_KAFKA_OAUTH_JWKS_URL", jwks)
                .env("VAP_KAFKA_OAUTH_AUDIENCE", super::oidc::AUDIENCE);
        }
        command
            .args(args)
            .env("VAP_RUN", self.run.path())
            .env("VAP_KAFKA_PORT", port.to_string())
            .env("VAP_KAFKA_CONTROLLER_PORT", controller.to_string())
            // No listener on the machine's own address: loopback only.
            .env("VAP_KAFKA_POD_ADDRESS", "off")
            .env("VAP_KAFKA_SECURE", "1")
            .env("VAP_KAFKA_SASL_SSL_PORT", sasl_ssl.to_string())
            .env("VAP_KAFKA_SSL_PORT", ssl.to_string())
            .env("VAP_KAFKA_SASL_PLAINTEXT_PORT", sasl_plaintext.to_string())
            .env("VAP_KAFKA_USERS", users.join(","))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run scripts/infra.d/kafka {args:?}: {e}"))
    }

    fn admin(&self, args: &[&str]) {
        let out = self.script(args);
        assert!(
            out.status.success(),
            "scripts/infra.d/kafka {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The PLAINTEXT listener (its principal is a super user).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.ports[0])
    }

    pub fn sasl_ssl(&self) -> String {
        format!("127.0.0.1:{}", self.ports[2])
    }

    /// The SASL_PLAINTEXT listener (SCRAM and PLAIN, no TLS).
    pub fn sasl_plaintext(&self) -> String {
        format!("127.0.0.1:{}", self.ports[4])
    }

    /// The SSL listener, which requires a client certificate.
    pub fn mutual_tls(&self) -> String {
        format!("127.0.0.1:{}", self.ports[3])
    }

    fn tls_file(&self, name: &str) -> PathBuf {
        self.run.path().join("kafka/tls").join(name)
    }

    /// The CA that signed the brokers' certificates.
    pub fn ca(&self) -> PathBuf {
        self.tls_file("ca.crt")
    }

    /// A client certificate and key for mutual TLS; its principal is `User:mtls-client`.
    pub fn client_cert(&self) -> (PathBuf, PathBuf) {
        (self.tls_file("client.crt"), self.tls_file("client.key"))
    }

    /// Grants `principal` (`User:name`) `operations` on `resource`
    /// (`--topic NAME`, `--group NAME`; `--resource-pattern-type prefixed` allowed).
    pub fn allow(&self, principal: &str, operations: &[&str], resource: &[&str]) {
        let mut args = vec!["acl", "--add", "--allow-principal", principal];
        for op in operations {
            args.extend(["--operation", op]);
        }
        args.extend(resource);
        self.admin(&args);
    }

    /// What the runner needs on its topics, as docs/security.md lists it:
    /// the supervisor (`supervisor`) reads commands with its group, writes
    /// the dead-letter and events topics and reads heartbeats; the worker
    /// (`worker`) writes results and heartbeats.
    pub fn grant_runner(&self, supervisor: &str, worker: &str, topics: &RunnerTopics<'_>) {
        let sup = format!("User:{supervisor}");
        for topic in [topics.deploy, topics.undeploy] {
            self.allow(&sup, &["Read", "Describe"], &["--topic", topic]);
        }
        self.allow(&sup, &["Read"], &["--group", topics.group]);
        for topic in [topics.dlq, topics.events] {
            self.allow(&sup, &["Write", "Describe"], &["--topic", topic]);
        }
        self.allow(&sup, &["Read", "Describe"], &["--topic", topics.heartbeats]);
        for topic in [topics.results, topics.heartbeats] {
            self.allow(
                &format!("User:{worker}"),
                &["Write", "Describe"],
                &["--topic", topic],
            );
        }
    }

    /// Sets `user`'s SCRAM-SHA-512 password.
    pub fn set_password(&self, user: &str, password: &str) {
        self.admin(&[
            "scram",
            "--alter",
            "--entity-name",
            user,
            "--add-config",
            &format!("SCRAM-SHA-512=[password={password}]"),
        ]);
    }

    /// A Kafka client configuration logging in as `user` over SASL_SSL.
    pub fn client(&self, user: &str, password: &str) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", self.sasl_ssl())
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", user)
            .set("sasl.password", password)
            .set("ssl.ca.location", self.ca().display().to_string());
        config
    }
}

impl Drop for SecureKafka {
    fn drop(&mut self) {
        let out = self.script(&["down"]);
        if !out.status.success() {
            eprintln!(
                "secured Kafka broker on {} did not come down: {}",
                self.bootstrap(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The topics and consumer group of one runner.
pub struct RunnerTopics<'a> {
    pub deploy: &'a str,
    pub undeploy: &'a str,
    pub dlq: &'a str,
    pub events: &'a str,
    pub results: &'a str,
    pub heartbeats: &'a str,
    pub group: &'a str,
}

/// Both beds name their topics and group alike.
macro_rules! runner_topics_of {
    ($bed:ty) => {
        impl<'a> From<&'a $bed> for RunnerTopics<'a> {
            fn from(bed: &'a $bed) -> Self {
                RunnerTopics {
                    deploy: &bed.deploy,
                    undeploy: &bed.undeploy,
                    dlq: &bed.dlq,
                    events: &bed.events,
                    results: &bed.results,
                    heartbeats: &bed.heartbeats,
                    group: &bed.group,
                }
            }
        }
    };
}

runner_topics_of!(super::local::LocalBed);
runner_topics_of!(super::controller::Bed);
