//! How every Kafka client of the runner connects: the controller's and
//! `runner local`'s consumer and producer, and each worker's producer.
//!
//! The settings are named after librdkafka's properties
//! (`KAFKA_SECURITY_PROTOCOL` is `security.protocol`, and so on). They are
//! resolved once at start-up into a [`KafkaSettings`]: files are read, the
//! combination is checked, and librdkafka is asked to accept every
//! property, so a bad setting stops start-up with one line that names it.
//!
//! Secrets (the SASL password, and whatever a properties file holds) are
//! never taken from the command line, never logged, and never shown by
//! `--help`: the password comes from `KAFKA_SASL_PASSWORD` in the
//! environment or from the file `KAFKA_SASL_PASSWORD_FILE` names, and
//! `--kafka-property` refuses the properties that carry secrets.
//!
//! [`KafkaHealth`] turns what the clients report (a refused login, a TLS
//! handshake that fails, a missing ACL) into one clear log line and a
//! failing `/readyz`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::BootstrapServers;

/// The variable that carries the SASL password (environment only).
pub const PASSWORD_VARIABLE: &str = "KAFKA_SASL_PASSWORD";

/// Every variable that says how a client connects. A worker of `runner
/// local` gets these from [`KafkaSettings::worker_env`] only, never as
/// inherited from the supervisor's environment (where, say, a user name
/// file would clash with the user name resolved from it).
pub const CONNECTION_VARIABLES: &[&str] = &[
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_USERNAME_FILE",
    PASSWORD_VARIABLE,
    "KAFKA_SASL_PASSWORD_FILE",
    "KAFKA_SSL_CA_LOCATION",
    "KAFKA_SSL_CERTIFICATE_LOCATION",
    "KAFKA_SSL_KEY_LOCATION",
    "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
    "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
    "KAFKA_SASL_OAUTHBEARER_SCOPE",
    "KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
    "KAFKA_PROPERTIES_FILE",
    "KAFKA_PROPERTIES",
];

/// librdkafka properties whose values are secrets: they may come from a
/// file or the environment, never from `--kafka-property`.
const SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.jaas.config",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.keystore.password",
    "ssl.truststore.password",
];

fn is_secret_property(key: &str) -> bool {
    SECRET_PROPERTIES.contains(&key) || key.contains("password") || key.contains("secret")
}

/// `security.protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

impl FromStr for SecurityProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "plaintext" => Ok(SecurityProtocol::Plaintext),
            "ssl" => Ok(SecurityProtocol::Ssl),
            "sasl_plaintext" => Ok(SecurityProtocol::SaslPlaintext),
            "sasl_ssl" => Ok(SecurityProtocol::SaslSsl),
            _ => Err(format!(
                "KAFKA_SECURITY_PROTOCOL={s:?} is not a protocol; use one of plaintext, ssl, sasl_plaintext, sasl_ssl"
            )),
        }
    }
}

/// `sasl.mechanism`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
    OauthBearer,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OauthBearer => "OAUTHBEARER",
        }
    }
}

impl FromStr for SaslMechanism {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().replace('_', "-").as_str() {
            "PLAIN" => Ok(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Ok(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(SaslMechanism::ScramSha512),
            "OAUTHBEARER" => Ok(SaslMechanism::OauthBearer),
            _ => Err(format!(
                "KAFKA_SASL_MECHANISM={s:?} is not a mechanism; use one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER"
            )),
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `--kafka-property key=value`: any librdkafka property that carries no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaProperty {
    pub key: String,
    pub value: String,
}

impl FromStr for KafkaProperty {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = s.split_once('=').ok_or_else(|| {
            format!(
                "--kafka-property {s:?} is not key=value; use a librdkafka property such as socket.keepalive.enable=true"
            )
        })?;
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "--kafka-property {s:?} has no property name before '='; use a librdkafka property such as socket.keepalive.enable=true"
            ));
        }
        // A secret is refused when the settings are resolved: refused here,
        // the parser's message would show the value.
        Ok(KafkaProperty {
            key: key.to_string(),
            value: value.trim().to_string(),
        })
    }
}

impl fmt::Display for KafkaProperty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Kafka connection settings, shared by every subcommand that talks to Kafka.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        value_name = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "localhost:9092"
    )]
    pub kafka_bootstrap_servers: BootstrapServers,

    /// How clients talk to the brokers: plaintext, ssl, sasl_plaintext or sasl_ssl (librdkafka's security.protocol; default plaintext).
    #[arg(
        long,
        env = "KAFKA_SECURITY_PROTOCOL",
        value_name = "KAFKA_SECURITY_PROTOCOL"
    )]
    pub kafka_security_protocol: Option<SecurityProtocol>,

    /// SASL mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, or OAUTHBEARER (OIDC client credentials: see KAFKA_SASL_OAUTHBEARER_*).
    #[arg(
        long,
        env = "KAFKA_SASL_MECHANISM",
        value_name = "KAFKA_SASL_MECHANISM"
    )]
    pub kafka_sasl_mechanism: Option<SaslMechanism>,

    /// SASL user name.
    #[arg(long, env = "KAFKA_SASL_USERNAME", value_name = "KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// File holding the SASL user name (a mounted Secret key), instead of KAFKA_SASL_USERNAME.
    #[arg(
        long,
        env = "KAFKA_SASL_USERNAME_FILE",
        value_name = "KAFKA_SASL_USERNAME_FILE"
    )]
    pub kafka_sasl_username_file: Option<PathBuf>,

    /// File holding the SASL password (a mounted Secret key). The password may also be given as KAFKA_SASL_PASSWORD in the environment; there is no flag for it, so that it never shows on a command line.
    #[arg(
        long,
        env = "KAFKA_SASL_PASSWORD_FILE",
        value_name = "KAFKA_SASL_PASSWORD_FILE"
    )]
    pub kafka_sasl_password_file: Option<PathBuf>,

    /// OAUTHBEARER: the OIDC provider's token endpoint (https://…), where the client credentials buy a token.
    #[arg(
        long,
        env = "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
        value_name = "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"
    )]
    pub kafka_sasl_oauthbearer_token_endpoint_url: Option<String>,

    /// OAUTHBEARER: the OIDC client id.
    #[arg(
        long,
        env = "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
        value_name = "KAFKA_SASL_OAUTHBEARER_CLIENT_ID"
    )]
    pub kafka_sasl_oauthbearer_client_id: Option<String>,

    /// OAUTHBEARER: file holding the OIDC client secret (a mounted Secret key); there is no flag for the secret itself.
    #[arg(
        long,
        env = "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
        value_name = "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE"
    )]
    pub kafka_sasl_oauthbearer_client_secret_file: Option<PathBuf>,

    /// OAUTHBEARER: the scope to ask the token endpoint for (optional).
    #[arg(
        long,
        env = "KAFKA_SASL_OAUTHBEARER_SCOPE",
        value_name = "KAFKA_SASL_OAUTHBEARER_SCOPE"
    )]
    pub kafka_sasl_oauthbearer_scope: Option<String>,

    /// OAUTHBEARER: SASL extensions for the brokers, key=value,key=value (optional; some managed clusters want logicalCluster and identityPoolId).
    #[arg(
        long,
        env = "KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
        value_name = "KAFKA_SASL_OAUTHBEARER_EXTENSIONS"
    )]
    pub kafka_sasl_oauthbearer_extensions: Option<String>,

    /// PEM file of the CA certificates that sign the brokers' certificates (default: the system's store).
    #[arg(
        long,
        env = "KAFKA_SSL_CA_LOCATION",
        value_name = "KAFKA_SSL_CA_LOCATION"
    )]
    pub kafka_ssl_ca_location: Option<PathBuf>,

    /// PEM file of this client's certificate, for mutual TLS.
    #[arg(
        long,
        env = "KAFKA_SSL_CERTIFICATE_LOCATION",
        value_name = "KAFKA_SSL_CERTIFICATE_LOCATION"
    )]
    pub kafka_ssl_certificate_location: Option<PathBuf>,

    /// PEM file of this client's private key, for mutual TLS.
    #[arg(
        long,
        env = "KAFKA_SSL_KEY_LOCATION",
        value_name = "KAFKA_SSL_KEY_LOCATION"
    )]
    pub kafka_ssl_key_location: Option<PathBuf>,

    /// Java-style properties file (key=value lines, # comments) of librdkafka properties, secrets included; the settings above and --kafka-property win over it.
    #[arg(
        long,
        env = "KAFKA_PROPERTIES_FILE",
        value_name = "KAFKA_PROPERTIES_FILE"
    )]
    pub kafka_properties_file: Option<PathBuf>,

    /// Any other librdkafka property without a secret, key=value; repeat the flag for several (in KAFKA_PROPERTIES, one per line).
    #[arg(
        long = "kafka-property",
        env = "KAFKA_PROPERTIES",
        value_name = "KEY=VALUE",
        value_delimiter = '\n'
    )]
    pub kafka_properties: Vec<KafkaProperty>,
}

/// A setting that keeps the runner from starting, in one line naming it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KafkaSettingError(pub String);

/// Where the SASL password came from.
#[derive(Clone, PartialEq, Eq)]
enum PasswordSource {
    Environment,
    File(PathBuf),
}

/// OAUTHBEARER with OIDC client credentials. `Debug` shows no secret.
#[derive(Clone, Default)]
pub struct Oidc {
    pub token_endpoint_url: Option<String>,
    pub client_id: Option<String>,
    /// The client secret and the file it came from.
    client_secret: Option<(String, PathBuf)>,
    pub scope: Option<String>,
    pub extensions: Option<String>,
}

impl fmt::Debug for Oidc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oidc")
            .field("token_endpoint_url", &self.token_endpoint_url)
            .field("client_id", &self.client_id)
            .field(
                "client_secret_file",
                &self.client_secret.as_ref().map(|(_, p)| p),
            )
            .finish_non_exhaustive()
    }
}

impl Oidc {
    fn resolve(args: &KafkaArgs) -> Result<Oidc, KafkaSettingError> {
        let client_secret = match &args.kafka_sasl_oauthbearer_client_secret_file {
            Some(path) => Some((
                strip_newline(read_setting_file(
                    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
                    path,
                )?),
                path.clone(),
            )),
            None => None,
        };
        let trimmed = |v: &Option<String>| v.as_ref().map(|v| v.trim().to_string());
        Ok(Oidc {
            token_endpoint_url: trimmed(&args.kafka_sasl_oauthbearer_token_endpoint_url),
            client_id: trimmed(&args.kafka_sasl_oauthbearer_client_id),
            client_secret,
            scope: trimmed(&args.kafka_sasl_oauthbearer_scope),
            extensions: trimmed(&args.kafka_sasl_oauthbearer_extensions),
        })
    }

    /// The settings given, by variable name.
    fn given(&self) -> Vec<&'static str> {
        [
            (
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                self.token_endpoint_url.is_some(),
            ),
            ("KAFKA_SASL_OAUTHBEARER_CLIENT_ID", self.client_id.is_some()),
            (
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
                self.client_secret.is_some(),
            ),
            ("KAFKA_SASL_OAUTHBEARER_SCOPE", self.scope.is_some()),
            (
                "KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
                self.extensions.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(var, set)| set.then_some(var))
        .collect()
    }

    /// librdkafka's properties for these settings.
    fn properties(&self) -> Vec<(&'static str, String)> {
        if self.given().is_empty() {
            return Vec::new();
        }
        let mut out = vec![("sasl.oauthbearer.method", "oidc".to_string())];
        for (key, value) in [
            (
                "sasl.oauthbearer.token.endpoint.url",
                &self.token_endpoint_url,
            ),
            ("sasl.oauthbearer.client.id", &self.client_id),
            ("sasl.oauthbearer.scope", &self.scope),
            ("sasl.oauthbearer.extensions", &self.extensions),
        ] {
            if let Some(v) = value {
                out.push((key, v.clone()));
            }
        }
        if let Some((secret, _)) = &self.client_secret {
            out.push(("sasl.oauthbearer.client.secret", secret.clone()));
        }
        out
    }

    /// The variables without a secret or its file (a worker Pod's, beside
    /// its own client id and secret).
    pub fn public_env(&self) -> Vec<(String, String)> {
        [
            (
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                &self.token_endpoint_url,
            ),
            ("KAFKA_SASL_OAUTHBEARER_SCOPE", &self.scope),
            ("KAFKA_SASL_OAUTHBEARER_EXTENSIONS", &self.extensions),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v.clone()?)))
        .collect()
    }

    /// The variables a worker process gets: the secret as its file.
    fn worker_env(&self) -> Vec<(&'static str, String)> {
        [
            (
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                self.token_endpoint_url.clone(),
            ),
            ("KAFKA_SASL_OAUTHBEARER_CLIENT_ID", self.client_id.clone()),
            (
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
                self.client_secret
                    .as_ref()
                    .map(|(_, p)| p.display().to_string()),
            ),
            ("KAFKA_SASL_OAUTHBEARER_SCOPE", self.scope.clone()),
            ("KAFKA_SASL_OAUTHBEARER_EXTENSIONS", self.extensions.clone()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
    }
}

/// A secret file's content without the newline a Secret's file may end with.
fn strip_newline(text: String) -> String {
    let p = text.strip_suffix('\n').unwrap_or(&text);
    p.strip_suffix('\r').unwrap_or(p).to_string()
}

/// The Kafka settings resolved: files read, the combination checked.
/// `Debug` shows no secret.
#[derive(Clone)]
pub struct KafkaSettings {
    pub bootstrap: BootstrapServers,
    pub protocol: Option<SecurityProtocol>,
    pub mechanism: Option<SaslMechanism>,
    pub username: Option<String>,
    password: Option<(String, PasswordSource)>,
    pub oidc: Oidc,
    pub ca_location: Option<PathBuf>,
    pub certificate_location: Option<PathBuf>,
    pub key_location: Option<PathBuf>,
    pub properties_file: Option<PathBuf>,
    file_properties: Vec<(String, String)>,
    pub properties: Vec<KafkaProperty>,
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Reads one small file a setting names, refusing with a line that names the setting.
fn read_setting_file(var: &str, path: &Path) -> Result<String, KafkaSettingError> {
    std::fs::read_to_string(path)
        .map_err(|e| KafkaSettingError(format!("{var}={}: cannot read it: {e}", path.display())))
}

/// Checks that a file a setting names can be opened.
fn check_readable(var: &str, path: &Path) -> Result<(), KafkaSettingError> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| KafkaSettingError(format!("{var}={}: cannot read it: {e}", path.display())))
}

/// Parses Java-style `key=value` (or `key: value`) lines; `#` and `!` start comments.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let split = line
            .find(['=', ':'])
            .ok_or_else(|| format!("line {} is not key=value", n + 1))?;
        let (key, value) = (line[..split].trim(), line[split + 1..].trim());
        if key.is_empty() {
            return Err(format!("line {} has no key before '='", n + 1));
        }
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

impl KafkaSettings {
    /// Resolves `args`, reading the password from `env` (the process
    /// environment in production).
    pub fn resolve(
        args: &KafkaArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<KafkaSettings, KafkaSettingError> {
        let file_properties = match &args.kafka_properties_file {
            Some(path) => parse_properties(&read_setting_file("KAFKA_PROPERTIES_FILE", path)?)
                .map_err(|e| {
                    KafkaSettingError(format!(
                        "KAFKA_PROPERTIES_FILE={}: {e}; use Java-style key=value lines",
                        path.display()
                    ))
                })?,
            None => Vec::new(),
        };
        let username = match (&args.kafka_sasl_username, &args.kafka_sasl_username_file) {
            (Some(_), Some(_)) => {
                return Err(KafkaSettingError(
                    "KAFKA_SASL_USERNAME and KAFKA_SASL_USERNAME_FILE are both set; set one".into(),
                ));
            }
            (Some(name), None) => Some(name.trim().to_string()),
            (None, Some(path)) => Some(
                read_setting_file("KAFKA_SASL_USERNAME_FILE", path)?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let from_env = env(PASSWORD_VARIABLE).filter(|p| !p.is_empty());
        let password = match (from_env, &args.kafka_sasl_password_file) {
            (Some(_), Some(_)) => {
                return Err(KafkaSettingError(
                    "KAFKA_SASL_PASSWORD and KAFKA_SASL_PASSWORD_FILE are both set; set one".into(),
                ));
            }
            (Some(p), None) => Some((p, PasswordSource::Environment)),
            (None, Some(path)) => {
                // A Secret's file may end with a newline the password does not have.
                let p = strip_newline(read_setting_file("KAFKA_SASL_PASSWORD_FILE", path)?);
                Some((p, PasswordSource::File(path.clone())))
            }
            (None, None) => None,
        };
        for (var, path) in [
            ("KAFKA_SSL_CA_LOCATION", &args.kafka_ssl_ca_location),
            (
                "KAFKA_SSL_CERTIFICATE_LOCATION",
                &args.kafka_ssl_certificate_location,
            ),
            ("KAFKA_SSL_KEY_LOCATION", &args.kafka_ssl_key_location),
        ] {
            if let Some(path) = path {
                check_readable(var, path)?;
            }
        }
        if let Some(secret) = args
            .kafka_properties
            .iter()
            .find(|p| is_secret_property(&p.key))
        {
            return Err(KafkaSettingError(format!(
                "--kafka-property {}=… carries a secret, which must not be on a command line or in an object spec; put it in KAFKA_PROPERTIES_FILE (or use KAFKA_SASL_PASSWORD_FILE)",
                secret.key
            )));
        }
        let settings = KafkaSettings {
            bootstrap: args.kafka_bootstrap_servers.clone(),
            protocol: args.kafka_security_protocol,
            mechanism: args.kafka_sasl_mechanism,
            username,
            password,
            oidc: Oidc::resolve(args)?,
            ca_location: args.kafka_ssl_ca_location.clone(),
            certificate_location: args.kafka_ssl_certificate_location.clone(),
            key_location: args.kafka_ssl_key_location.clone(),
            properties_file: args.kafka_properties_file.clone(),
            file_properties,
            properties: args.kafka_properties.clone(),
        };
        settings.check()?;
        Ok(settings)
    }

    /// Every property as the clients get it, later sources winning: the
    /// properties file, the named settings, then `--kafka-property`.
    fn properties_map(&self) -> BTreeMap<String, String> {
        let mut map: BTreeMap<String, String> = self.file_properties.iter().cloned().collect();
        map.insert("bootstrap.servers".into(), self.bootstrap.to_string());
        if let Some(p) = self.protocol {
            map.insert("security.protocol".into(), p.as_str().into());
        }
        if let Some(m) = self.mechanism {
            map.insert("sasl.mechanism".into(), m.as_str().into());
        }
        if let Some(u) = &self.username {
            map.insert("sasl.username".into(), u.clone());
        }
        if let Some((p, _)) = &self.password {
            map.insert("sasl.password".into(), p.clone());
        }
        for (key, value) in self.oidc.properties() {
            map.insert(key.into(), value);
        }
        for (key, path) in [
            ("ssl.ca.location", &self.ca_location),
            ("ssl.certificate.location", &self.certificate_location),
            ("ssl.key.location", &self.key_location),
        ] {
            if let Some(path) = path {
                map.insert(key.into(), path.display().to_string());
            }
        }
        for p in &self.properties {
            map.insert(p.key.clone(), p.value.clone());
        }
        map
    }

    /// The settings' combination makes sense, and librdkafka takes every property.
    fn check(&self) -> Result<(), KafkaSettingError> {
        let map = self.properties_map();
        let err = |s: String| Err(KafkaSettingError(s));
        let protocol = map
            .get("security.protocol")
            .map(|p| p.parse::<SecurityProtocol>())
            .transpose()
            .map_err(KafkaSettingError)?
            .unwrap_or(SecurityProtocol::Plaintext);
        let mechanism = map
            .get("sasl.mechanism")
            .map(|m| m.parse::<SaslMechanism>())
            .transpose()
            .map_err(KafkaSettingError)?;
        if !protocol.sasl() {
            if let Some(var) = [
                ("KAFKA_SASL_MECHANISM", self.mechanism.is_some()),
                ("KAFKA_SASL_USERNAME", self.username.is_some()),
                ("KAFKA_SASL_PASSWORD", self.password.is_some()),
            ]
            .iter()
            .find_map(|(var, set)| set.then_some(*var))
            .or(self.oidc.given().first().copied())
            {
                return err(format!(
                    "{var} is set but KAFKA_SECURITY_PROTOCOL={} uses no SASL; use sasl_ssl (or sasl_plaintext)",
                    protocol.as_str()
                ));
            }
        } else {
            match mechanism {
                None => {
                    return err(format!(
                        "KAFKA_SECURITY_PROTOCOL={} needs KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)",
                        protocol.as_str()
                    ));
                }
                Some(SaslMechanism::OauthBearer) => {
                    if let Some(var) = [
                        ("KAFKA_SASL_USERNAME", self.username.is_some()),
                        ("KAFKA_SASL_PASSWORD", self.password.is_some()),
                    ]
                    .iter()
                    .find_map(|(var, set)| set.then_some(var))
                    {
                        return err(format!(
                            "{var} is set but KAFKA_SASL_MECHANISM=OAUTHBEARER logs in with OIDC client credentials; unset it and set KAFKA_SASL_OAUTHBEARER_CLIENT_ID and KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE"
                        ));
                    }
                    if map.get("sasl.oauthbearer.method").map(String::as_str) != Some("oidc") {
                        return err(
                            "KAFKA_SASL_MECHANISM=OAUTHBEARER needs the OIDC client-credentials settings; set KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL, KAFKA_SASL_OAUTHBEARER_CLIENT_ID and KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE".into(),
                        );
                    }
                    for (key, var) in [
                        (
                            "sasl.oauthbearer.token.endpoint.url",
                            "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                        ),
                        (
                            "sasl.oauthbearer.client.id",
                            "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
                        ),
                        (
                            "sasl.oauthbearer.client.secret",
                            "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
                        ),
                    ] {
                        if map.get(key).is_none_or(|v| v.is_empty()) {
                            return err(format!("KAFKA_SASL_MECHANISM=OAUTHBEARER needs {var}"));
                        }
                    }
                    if let Some(url) = map.get("sasl.oauthbearer.token.endpoint.url") {
                        match url::Url::parse(url) {
                            Ok(u) if matches!(u.scheme(), "https" | "http") => {}
                            _ => {
                                return err(format!(
                                    "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL={url:?} is not an http(s) URL; use the OIDC provider's token endpoint, such as https://idp.example/oauth2/token"
                                ));
                            }
                        }
                    }
                }
                Some(m) => {
                    if let Some(var) = self.oidc.given().first() {
                        return err(format!(
                            "{var} is set but KAFKA_SASL_MECHANISM={m}; use OAUTHBEARER, or unset it"
                        ));
                    }
                    if !map.contains_key("sasl.username") {
                        return err(format!(
                            "KAFKA_SASL_MECHANISM={m} needs a user name; set KAFKA_SASL_USERNAME or KAFKA_SASL_USERNAME_FILE"
                        ));
                    }
                    if !map.contains_key("sasl.password") {
                        return err(format!(
                            "KAFKA_SASL_MECHANISM={m} needs a password; set KAFKA_SASL_PASSWORD_FILE (or KAFKA_SASL_PASSWORD in the environment)"
                        ));
                    }
                }
            }
        }
        if !protocol.tls() {
            if let Some(var) = [
                ("KAFKA_SSL_CA_LOCATION", self.ca_location.is_some()),
                (
                    "KAFKA_SSL_CERTIFICATE_LOCATION",
                    self.certificate_location.is_some(),
                ),
                ("KAFKA_SSL_KEY_LOCATION", self.key_location.is_some()),
            ]
            .iter()
            .find_map(|(var, set)| set.then_some(var))
            {
                return err(format!(
                    "{var} is set but KAFKA_SECURITY_PROTOCOL={} uses no TLS; use ssl or sasl_ssl",
                    protocol.as_str()
                ));
            }
        }
        if self.certificate_location.is_some() != self.key_location.is_some() {
            return err(
                "KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION go together (mutual TLS needs both); set both or neither".into(),
            );
        }
        // librdkafka checks names and values of every property.
        let mut config = ClientConfig::new();
        for (k, v) in &map {
            config.set(k, v);
        }
        config.create_native_config().map_err(|e| {
            let from = if self.properties_file.is_some() {
                "KAFKA_PROPERTIES_FILE or --kafka-property"
            } else {
                "--kafka-property"
            };
            KafkaSettingError(format!("a Kafka property is refused ({from}): {e}"))
        })?;
        Ok(())
    }

    /// The base configuration of every client: bootstrap servers, security
    /// and the user's properties. Each client adds its own settings after.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (k, v) in self.properties_map() {
            config.set(k, v);
        }
        config
    }

    /// The protocol in effect (from the settings or the properties file).
    pub fn effective_protocol(&self) -> SecurityProtocol {
        self.properties_map()
            .get("security.protocol")
            .and_then(|p| p.parse().ok())
            .unwrap_or(SecurityProtocol::Plaintext)
    }

    /// The SASL mechanism in effect (from the settings or the properties file).
    pub fn effective_mechanism(&self) -> Option<String> {
        self.properties_map().get("sasl.mechanism").cloned()
    }

    /// Whether the clients log in with SASL.
    pub fn uses_sasl(&self) -> bool {
        self.effective_protocol().sasl()
    }

    /// What the log may say about these settings: no secret.
    pub fn summary(&self) -> String {
        let map = self.properties_map();
        let mut parts = vec![format!("bootstrap={}", self.bootstrap)];
        parts.push(format!(
            "security.protocol={}",
            self.effective_protocol().as_str()
        ));
        for key in [
            "sasl.mechanism",
            "sasl.username",
            "sasl.oauthbearer.client.id",
            "sasl.oauthbearer.token.endpoint.url",
            "ssl.ca.location",
            "ssl.certificate.location",
        ] {
            if let Some(v) = map.get(key) {
                parts.push(format!("{key}={v}"));
            }
        }
        if let Some(path) = &self.properties_file {
            parts.push(format!("properties_file={}", path.display()));
        }
        parts.join(" ")
    }

    /// What a user should check when the brokers refuse the login.
    fn login_hint(&self) -> String {
        let map = self.properties_map();
        if map.get("sasl.mechanism").map(String::as_str) == Some("OAUTHBEARER") {
            let client = map
                .get("sasl.oauthbearer.client.id")
                .map(|c| format!(" of KAFKA_SASL_OAUTHBEARER_CLIENT_ID={c:?}"))
                .unwrap_or_default();
            return format!(
                "Kafka's OAUTHBEARER login{client} failed: check KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE, KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL and KAFKA_SASL_OAUTHBEARER_SCOPE (the token endpoint must accept the client, and the brokers its token)"
            );
        }
        let user = self
            .properties_map()
            .get("sasl.username")
            .map(|u| format!(" of KAFKA_SASL_USERNAME={u:?}"))
            .unwrap_or_default();
        format!(
            "Kafka refused the login{user}: check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD_FILE (or KAFKA_SASL_PASSWORD) and KAFKA_SASL_MECHANISM"
        )
    }

    /// The environment a worker process of `runner local` gets to produce
    /// with these settings. The password travels in the worker's
    /// environment (or as the file it came from), never on its command line.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let mut env = vec![(
            "KAFKA_BOOTSTRAP_SERVERS".to_string(),
            self.bootstrap.to_string(),
        )];
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                env.push((k.to_string(), v));
            }
        };
        add(
            "KAFKA_SECURITY_PROTOCOL",
            self.protocol.map(|p| p.as_str().to_string()),
        );
        add(
            "KAFKA_SASL_MECHANISM",
            self.mechanism.map(|m| m.as_str().to_string()),
        );
        add("KAFKA_SASL_USERNAME", self.username.clone());
        match &self.password {
            Some((_, PasswordSource::File(path))) => {
                add("KAFKA_SASL_PASSWORD_FILE", Some(path.display().to_string()))
            }
            Some((p, PasswordSource::Environment)) => add(PASSWORD_VARIABLE, Some(p.clone())),
            None => {}
        }
        for (k, v) in self.oidc.worker_env() {
            add(k, Some(v));
        }
        for (k, v) in [
            ("KAFKA_SSL_CA_LOCATION", &self.ca_location),
            ("KAFKA_SSL_CERTIFICATE_LOCATION", &self.certificate_location),
            ("KAFKA_SSL_KEY_LOCATION", &self.key_location),
            ("KAFKA_PROPERTIES_FILE", &self.properties_file),
        ] {
            add(k, v.as_ref().map(|p| p.display().to_string()));
        }
        if !self.properties.is_empty() {
            add("KAFKA_PROPERTIES", Some(self.properties_text()));
        }
        env
    }

    /// `--kafka-property` entries as `KAFKA_PROPERTIES` carries them (one per line).
    pub fn properties_text(&self) -> String {
        self.properties
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The health record and client context for these settings.
    pub fn context(&self) -> KafkaContext {
        KafkaContext {
            health: std::sync::Arc::new(KafkaHealth::new(
                self.login_hint(),
                self.bootstrap.to_string(),
            )),
        }
    }
}

/// How often the supervisors ask the brokers whether they answer.
pub const KAFKA_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long one such question may take.
pub const KAFKA_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an authorization refusal keeps `/readyz` failing after it was
/// last reported (librdkafka repeats it while it lasts).
const REFUSAL_MEMORY: Duration = Duration::from_secs(30);

/// What the Kafka clients last reported that keeps the runner from working.
#[derive(Debug)]
pub struct KafkaHealth {
    login_hint: String,
    /// KAFKA_BOOTSTRAP_SERVERS as given, named when no broker answers.
    bootstrap: String,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// The connection problem (login, TLS, brokers down) until a probe succeeds.
    connection: Option<(Problem, String)>,
    /// An authorization refusal (a missing ACL) and when it was last seen.
    refusal: Option<(String, Instant)>,
    /// What was logged since the clients last worked: each problem once.
    logged: std::collections::BTreeSet<String>,
}

/// The kinds of problem, each fixed in its own place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// No broker answers (address, protocol, network).
    Unreachable,
    /// The TLS handshake fails (CA, client certificate).
    Tls,
    /// The brokers refuse the login (user, password, mechanism).
    Login,
    /// The brokers refuse an operation (ACLs).
    Refused,
}

impl KafkaHealth {
    fn new(login_hint: String, bootstrap: String) -> Self {
        KafkaHealth {
            login_hint,
            bootstrap,
            state: Mutex::new(HealthState::default()),
        }
    }

    /// The reason `/readyz` fails, if Kafka refuses or cannot be reached.
    pub fn problem(&self) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = &state.connection {
            return Some(c.clone());
        }
        state
            .refusal
            .as_ref()
            .filter(|(_, at)| at.elapsed() < REFUSAL_MEMORY)
            .map(|(r, _)| r.clone())
    }

    /// Explains an error in terms of the settings to check, or `None` when
    /// it is not one the user can fix in the settings or ACLs.
    pub fn explain(
        &self,
        code: Option<RDKafkaErrorCode>,
        reason: &str,
    ) -> Option<(Problem, String)> {
        use RDKafkaErrorCode as C;
        let code = code?;
        Some(match code {
            C::Authentication | C::SaslAuthenticationFailed => {
                (Problem::Login, format!("{}; {reason}", self.login_hint))
            }
            C::SSL => (
                Problem::Tls,
                format!(
                    "the TLS handshake with Kafka failed: check KAFKA_SSL_CA_LOCATION (the CA that signed the brokers' certificates) and, for mutual TLS, KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION; {reason}"
                ),
            ),
            C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed => (
                Problem::Refused,
                format!(
                    "Kafka refused an operation for lack of an ACL ({code}); grant this principal what docs/security.md (\"Secured Kafka\") lists; {reason}"
                ),
            ),
            C::AllBrokersDown => (
                Problem::Unreachable,
                format!(
                    "no Kafka broker can be reached at KAFKA_BOOTSTRAP_SERVERS={}: check KAFKA_BOOTSTRAP_SERVERS and KAFKA_SECURITY_PROTOCOL; {reason}",
                    self.bootstrap
                ),
            ),
            _ => return None,
        })
    }

    /// Records what a client reported, logging each problem once while it
    /// lasts. A refused login or a failed TLS handshake is what "all
    /// brokers down" then means: it stays the reason shown.
    pub fn record(&self, error: &KafkaError, reason: &str) {
        let Some((problem, line)) = self.explain(error.rdkafka_error_code(), reason) else {
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = match problem {
            Problem::Refused => {
                state.refusal = Some((line.clone(), Instant::now()));
                format!("{code:?}", code = error.rdkafka_error_code())
            }
            _ => {
                let known = state.connection.as_ref().map(|(p, _)| *p);
                if known.is_none_or(|k| k <= problem) {
                    state.connection = Some((problem, line.clone()));
                }
                format!("{problem:?}")
            }
        };
        if state.logged.insert(key) {
            tracing::error!("{line}");
        }
    }

    /// A request reached the brokers and was answered: the connection works.
    pub fn connected(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.connection.take().is_some() {
            tracing::info!("Kafka answers again");
            state.logged.clear();
        }
    }
}

/// The producer of the supervisors, with its errors explained.
pub type KafkaProducer = rdkafka::producer::FutureProducer<KafkaContext>;

/// The context of the runner's Kafka clients: their errors go to [`KafkaHealth`].
#[derive(Clone)]
pub struct KafkaContext {
    pub health: std::sync::Arc<KafkaHealth>,
}

impl ClientContext for KafkaContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if self
            .health
            .explain(error.rdkafka_error_code(), reason)
            .is_some()
        {
            self.health.record(&error, reason);
        } else {
            tracing::warn!(error = %error, "Kafka client error: {reason}");
        }
    }
}

impl ConsumerContext for KafkaContext {}

/// Asks the brokers for metadata through `producer` every
/// [`KAFKA_PROBE_INTERVAL`], so that a login that starts to work again, or
/// stops, shows on `/readyz`.
pub fn probe(producer: &KafkaProducer, context: &KafkaContext) -> tokio::task::JoinHandle<()> {
    use rdkafka::producer::Producer;
    let producer = producer.clone();
    let health = context.health.clone();
    tokio::spawn(async move {
        loop {
            let client = producer.clone();
            let asked = tokio::task::spawn_blocking(move || {
                client.client().fetch_metadata(None, KAFKA_PROBE_TIMEOUT)
            });
            match asked.await {
                Ok(Ok(_)) => health.connected(),
                Ok(Err(e)) => health.record(&e, &e.to_string()),
                Err(_) => return,
            }
            tokio::time::sleep(KAFKA_PROBE_INTERVAL).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn args(flags: &[&str]) -> KafkaArgs {
        let mut all = vec!["runner"];
        all.extend(flags);
        Cli::try_parse_from(all).unwrap().kafka
    }

    fn resolve(flags: &[&str], password: Option<&str>) -> Result<KafkaSettings, String> {
        let password = password.map(str::to_string);
        KafkaSettings::resolve(&args(flags), |name| {
            (name == PASSWORD_VARIABLE)
                .then(|| password.clone())
                .flatten()
        })
        .map_err(|e| e.0)
    }

    #[test]
    fn sasl_ssl_with_scram_gives_librdkafka_its_properties() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let s = resolve(
            &[
                "--kafka-security-protocol",
                "SASL_SSL",
                "--kafka-sasl-mechanism",
                "scram-sha-512",
                "--kafka-sasl-username",
                "runner",
                "--kafka-ssl-ca-location",
                ca.to_str().unwrap(),
                "--kafka-property",
                "socket.keepalive.enable=true",
            ],
            Some("S3cret-pw"),
        )
        .unwrap();
        let config = s.client_config();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("runner"));
        assert_eq!(config.get("sasl.password"), Some("S3cret-pw"));
        assert_eq!(config.get("socket.keepalive.enable"), Some("true"));
        let shown = format!("{} {s:?}", s.summary());
        assert!(!shown.contains("S3cret-pw"), "{shown}");
        assert!(shown.contains("sasl.username=runner"), "{shown}");
        let env = s.worker_env();
        assert!(env.contains(&(PASSWORD_VARIABLE.into(), "S3cret-pw".into())));
        assert!(env.contains(&(
            "KAFKA_PROPERTIES".into(),
            "socket.keepalive.enable=true".into()
        )));
    }

    #[test]
    fn oauthbearer_takes_oidc_client_credentials_with_the_secret_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client-secret");
        std::fs::write(&file, "Cl1ent-s3cret\n").unwrap();
        let secret = file.to_str().unwrap();
        let oidc = [
            "--kafka-security-protocol",
            "sasl_ssl",
            "--kafka-sasl-mechanism",
            "OAUTHBEARER",
            "--kafka-sasl-oauthbearer-token-endpoint-url",
            "https://idp.example/oauth2/token",
            "--kafka-sasl-oauthbearer-client-id",
            "runner",
            "--kafka-sasl-oauthbearer-client-secret-file",
            secret,
            "--kafka-sasl-oauthbearer-scope",
            "kafka",
            "--kafka-sasl-oauthbearer-extensions",
            "logicalCluster=lkc-1,identityPoolId=pool-2",
        ];
        let s = resolve(&oidc, None).unwrap();
        let config = s.client_config();
        for (key, value) in [
            ("sasl.mechanism", "OAUTHBEARER"),
            ("sasl.oauthbearer.method", "oidc"),
            (
                "sasl.oauthbearer.token.endpoint.url",
                "https://idp.example/oauth2/token",
            ),
            ("sasl.oauthbearer.client.id", "runner"),
            ("sasl.oauthbearer.client.secret", "Cl1ent-s3cret"),
            ("sasl.oauthbearer.scope", "kafka"),
            (
                "sasl.oauthbearer.extensions",
                "logicalCluster=lkc-1,identityPoolId=pool-2",
            ),
        ] {
            assert_eq!(config.get(key), Some(value), "{key}");
        }
        let shown = format!("{} {s:?} {:?}", s.summary(), s.worker_env());
        assert!(!shown.contains("Cl1ent-s3cret"), "{shown}");
        assert!(
            shown.contains("sasl.oauthbearer.client.id=runner"),
            "{shown}"
        );
        assert!(s.worker_env().contains(&(
            "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE".into(),
            secret.into()
        )));
        let health = s.context().health;
        let (_, line) = health
            .explain(Some(RDKafkaErrorCode::Authentication), "401")
            .unwrap();
        assert!(
            line.contains("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE")
                && line.contains("\"runner\""),
            "{line}"
        );

        // Each missing or misplaced piece is named.
        for (drop, var) in [
            (
                "--kafka-sasl-oauthbearer-client-secret-file",
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
            ),
            (
                "--kafka-sasl-oauthbearer-client-id",
                "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
            ),
            (
                "--kafka-sasl-oauthbearer-token-endpoint-url",
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
            ),
        ] {
            let i = oidc.iter().position(|f| *f == drop).unwrap();
            let flags: Vec<&str> = oidc[..i].iter().chain(&oidc[i + 2..]).copied().collect();
            let err = resolve(&flags, None).unwrap_err();
            assert!(err.contains(var) && !err.contains('\n'), "{err}");
        }
        let mut scram = oidc.to_vec();
        scram[3] = "SCRAM-SHA-512";
        let err = resolve(&scram, None).unwrap_err();
        assert!(
            err.contains("KAFKA_SASL_OAUTHBEARER_") && err.contains("SCRAM"),
            "{err}"
        );
        let mut bad_url = oidc.to_vec();
        bad_url[5] = "idp.example/token";
        let err = resolve(&bad_url, None).unwrap_err();
        assert!(
            err.contains("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"),
            "{err}"
        );
        let err =
            resolve(&[&oidc[..], &["--kafka-sasl-username", "u"]].concat(), None).unwrap_err();
        assert!(err.contains("KAFKA_SASL_USERNAME"), "{err}");
    }

    #[test]
    fn every_setting_is_a_connection_variable() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let named: Vec<String> = cli
            .get_arguments()
            .filter_map(|a| a.get_env()?.to_str().map(str::to_string))
            .collect();
        assert!(named.len() > 5, "{named:?}");
        for var in named.iter().map(String::as_str).chain([PASSWORD_VARIABLE]) {
            assert!(CONNECTION_VARIABLES.contains(&var), "{var}");
        }
    }

    #[test]
    fn the_password_file_loses_its_trailing_newline_and_travels_as_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "pw from file\n").unwrap();
        let s = resolve(
            &[
                "--kafka-security-protocol",
                "sasl_plaintext",
                "--kafka-sasl-mechanism",
                "PLAIN",
                "--kafka-sasl-username",
                "u",
                "--kafka-sasl-password-file",
                file.to_str().unwrap(),
            ],
            None,
        )
        .unwrap();
        assert_eq!(s.client_config().get("sasl.password"), Some("pw from file"));
        let env = s.worker_env();
        assert!(env.iter().all(|(k, _)| k != PASSWORD_VARIABLE));
        assert!(env.contains(&(
            "KAFKA_SASL_PASSWORD_FILE".into(),
            file.display().to_string()
        )));
    }

    #[test]
    fn bad_combinations_fail_in_one_line_naming_the_setting() {
        for (flags, password, var) in [
            (
                vec!["--kafka-sasl-username", "u"],
                Some("pw"),
                "KAFKA_SASL_USERNAME",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "sasl_ssl",
                    "--kafka-sasl-mechanism",
                    "PLAIN",
                ],
                Some("pw"),
                "KAFKA_SASL_USERNAME",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "sasl_ssl",
                    "--kafka-sasl-mechanism",
                    "PLAIN",
                    "--kafka-sasl-username",
                    "u",
                ],
                None,
                "KAFKA_SASL_PASSWORD",
            ),
            (
                vec!["--kafka-security-protocol", "sasl_ssl"],
                None,
                "KAFKA_SASL_MECHANISM",
            ),
            (
                vec!["--kafka-ssl-ca-location", "/etc/hostname"],
                None,
                "KAFKA_SSL_CA_LOCATION",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "ssl",
                    "--kafka-ssl-ca-location",
                    "/nonexistent/ca.crt",
                ],
                None,
                "KAFKA_SSL_CA_LOCATION",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "ssl",
                    "--kafka-ssl-certificate-location",
                    "/etc/hostname",
                ],
                None,
                "KAFKA_SSL_KEY_LOCATION",
            ),
            (
                vec!["--kafka-property", "no.such.property=1"],
                None,
                "--kafka-property",
            ),
            (
                vec![
                    "--kafka-security-protocol",
                    "sasl_ssl",
                    "--kafka-sasl-mechanism",
                    "OAUTHBEARER",
                ],
                None,
                "OAUTHBEARER",
            ),
        ] {
            let err = resolve(&flags, password).unwrap_err();
            assert!(err.contains(var) && !err.contains('\n'), "{flags:?}: {err}");
        }
    }

    #[test]
    fn secrets_are_refused_on_the_command_line() {
        for bad in [
            "sasl.password=x",
            "ssl.key.password=x",
            "sasl.oauthbearer.client.secret=x",
            "sasl.jaas.config=x",
        ] {
            let err = resolve(&["--kafka-property", bad], None).unwrap_err();
            assert!(err.contains("KAFKA_PROPERTIES_FILE"), "{err}");
            assert!(!err.contains("=x"), "{err}");
        }
        let err = Cli::try_parse_from(["runner", "--kafka-security-protocol", "tls"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("KAFKA_SECURITY_PROTOCOL"), "{err}");
    }

    #[test]
    fn a_properties_file_may_hold_the_secrets_and_the_settings_win_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.properties");
        std::fs::write(
            &file,
            "# managed cluster\nsecurity.protocol=SASL_SSL\nsasl.mechanism=PLAIN\n\
             sasl.username=key\nsasl.password = sec=ret\n! comment\nclient.id: from-file\n",
        )
        .unwrap();
        let s = resolve(
            &[
                "--kafka-properties-file",
                file.to_str().unwrap(),
                "--kafka-property",
                "client.id=from-flag",
            ],
            None,
        )
        .unwrap();
        let config = s.client_config();
        assert_eq!(config.get("sasl.password"), Some("sec=ret"));
        assert_eq!(config.get("client.id"), Some("from-flag"));
        assert_eq!(s.effective_protocol(), SecurityProtocol::SaslSsl);
        assert!(!s.summary().contains("sec=ret"));
        std::fs::write(&file, "just words\n").unwrap();
        let err = resolve(&["--kafka-properties-file", file.to_str().unwrap()], None).unwrap_err();
        assert!(
            err.contains("KAFKA_PROPERTIES_FILE") && err.contains("line 1"),
            "{err}"
        );
    }

    #[test]
    fn errors_are_explained_by_the_setting_to_check() {
        let s = resolve(&[], None).unwrap();
        let health = s.context().health;
        let (kind, login) = health
            .explain(Some(RDKafkaErrorCode::Authentication), "SASL failed")
            .unwrap();
        assert!(kind == Problem::Login && login.contains("KAFKA_SASL_PASSWORD"));
        let (kind, tls) = health
            .explain(Some(RDKafkaErrorCode::SSL), "certificate verify failed")
            .unwrap();
        assert!(kind == Problem::Tls && tls.contains("KAFKA_SSL_CA_LOCATION"));
        assert!(
            health
                .explain(Some(RDKafkaErrorCode::MessageTimedOut), "")
                .is_none()
        );
        health.record(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL failed",
        );
        health.record(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        // The refused login stays the reason shown.
        assert!(health.problem().unwrap().contains("refused the login"));
        health.connected();
        assert!(health.problem().is_none());
        health.record(
            &KafkaError::Global(RDKafkaErrorCode::TopicAuthorizationFailed),
            "to_deploy",
        );
        assert!(health.problem().unwrap().contains("ACL"));
    }
}
