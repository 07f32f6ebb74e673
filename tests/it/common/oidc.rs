//! An OIDC provider of one test's own, real over HTTP: a token endpoint for
//! the client-credentials flow (librdkafka's `sasl.oauthbearer.method=oidc`)
//! that issues RS256-signed JWTs, and the JWKS the broker checks them with
//! (Kafka's OAuthBearerValidatorCallbackHandler). The RSA key is generated
//! with the `openssl` CLI, tokens are signed with `ring`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ring::rsa::{KeyPair, PublicKeyComponents};
use ring::signature::RSA_PKCS1_SHA256;

/// The audience every token carries and the broker expects.
pub const AUDIENCE: &str = "vap-kafka";
const KEY_ID: &str = "bed-key";

struct Provider {
    key: KeyPair,
    /// client id → (client secret, the token's `sub`).
    clients: Mutex<Vec<(String, String, String)>>,
    /// Token requests answered, and refused.
    issued: Mutex<(usize, usize)>,
    /// The `scope` of the last token request.
    last_scope: Mutex<Option<String>>,
}

pub struct Oidc {
    addr: SocketAddr,
    provider: Arc<Provider>,
    task: tokio::task::JoinHandle<()>,
}

impl Oidc {
    /// Starts the provider with one client per `(client id, secret, sub)`.
    pub async fn start(clients: &[(&str, &str, &str)]) -> Oidc {
        let dir = tempfile::tempdir().expect("temp dir");
        let der = dir.path().join("key.der");
        super::run_ok(
            std::process::Command::new("openssl").args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
                "-out",
                der.to_str().expect("path"),
            ]),
            "the tests generate the provider's key with the openssl CLI",
        );
        let key = KeyPair::from_der(&std::fs::read(&der).expect("key")).expect("RSA key");
        let provider = Arc::new(Provider {
            key,
            clients: Mutex::new(
                clients
                    .iter()
                    .map(|(c, s, sub)| (c.to_string(), s.to_string(), sub.to_string()))
                    .collect(),
            ),
            issued: Mutex::new((0, 0)),
            last_scope: Mutex::new(None),
        });
        let app = axum::Router::new()
            .route("/token", post(token))
            .route("/jwks", get(jwks))
            .with_state(provider.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Oidc {
            addr,
            provider,
            task,
        }
    }

    pub fn token_endpoint(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn jwks_url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    /// Sets the secret `client` is accepted with.
    pub fn set_secret(&self, client: &str, secret: &str) {
        let mut clients = self.provider.clients.lock().unwrap();
        let entry = clients
            .iter_mut()
            .find(|(c, _, _)| c == client)
            .expect("a known client");
        entry.1 = secret.to_string();
    }

    /// Tokens issued and token requests refused so far.
    pub fn counts(&self) -> (usize, usize) {
        *self.provider.issued.lock().unwrap()
    }

    /// The `scope` the last token request asked for.
    pub fn last_scope(&self) -> Option<String> {
        self.provider.last_scope.lock().unwrap().clone()
    }
}

impl Drop for Oidc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The client-credentials grant, the client authenticated with HTTP Basic.
async fn token(State(p): State<Arc<Provider>>, headers: HeaderMap, body: String) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    *p.last_scope.lock().unwrap() = field("scope");
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let sub = p
        .clients
        .lock()
        .unwrap()
        .iter()
        .find(|(c, s, _)| authorization == format!("Basic {}", base64(&format!("{c}:{s}"), false)))
        .map(|(_, _, sub)| sub.clone());
    let grant = field("grant_type");
    let (Some(sub), Some("client_credentials")) = (sub, grant.as_deref()) else {
        p.issued.lock().unwrap().1 += 1;
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client"}),
        );
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": KEY_ID});
    let claims = serde_json::json!({
        "sub": sub, "aud": AUDIENCE, "iss": "vap-test-oidc",
        "iat": now, "exp": now + 3600, "scope": field("scope").unwrap_or_default(),
    });
    let signed = format!(
        "{}.{}",
        base64(&header.to_string(), true),
        base64(&claims.to_string(), true)
    );
    let mut signature = vec![0; p.key.public().modulus_len()];
    p.key
        .sign(
            &RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            signed.as_bytes(),
            &mut signature,
        )
        .expect("sign");
    p.issued.lock().unwrap().0 += 1;
    json(
        StatusCode::OK,
        serde_json::json!({
            "access_token": format!("{signed}.{}", base64_bytes(&signature, true)),
            "token_type": "Bearer",
            "expires_in": 3600,
        }),
    )
}

async fn jwks(State(p): State<Arc<Provider>>) -> Response {
    let public = PublicKeyComponents::<Vec<u8>>::from(p.key.public());
    json(
        StatusCode::OK,
        serde_json::json!({"keys": [{
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": KEY_ID,
            "n": base64_bytes(&public.n, true), "e": base64_bytes(&public.e, true),
        }]}),
    )
}

fn base64(text: &str, url: bool) -> String {
    base64_bytes(text.as_bytes(), url)
}

/// Base64: URL-safe without padding (JWT), or standard with padding (HTTP Basic).
pub fn base64_bytes(data: &[u8], url: bool) -> String {
    let alphabet: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if !url {
            out.push_str(&"=".repeat(3 - chunk.len()));
        }
    }
    out
}

#[test]
fn base64_matches_the_rfc_4648_vectors() {
    assert_eq!(base64("foobar", false), "Zm9vYmFy");
    assert_eq!(base64("fooba", false), "Zm9vYmE=");
    assert_eq!(base64("foob", false), "Zm9vYg==");
    assert_eq!(base64_bytes(&[0xfb, 0xff], true), "-_8");
}
