//! A way to the bed's kube-apiserver whose view of one resource can be made
//! to lag, as a cache does on a slow or busy cluster: `kubectl proxy` (plain
//! HTTP on the loopback, one request per connection at a time) behind a relay
//! that reads each request line. While held, what the server answers to the
//! lists and watches of the resource that select by label (a cache's: the
//! runner's caches hold only its own objects) waits in the relay; every other
//! call goes through, a start-up check's plain list included.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use super::fencing::relay;

/// `kubectl proxy` and the relay in front of it; both stop when dropped.
pub struct LaggingWatch {
    held: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
    _proxy: tokio::process::Child,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl LaggingWatch {
    /// Starts `kubectl proxy` with the bed's admin kubeconfig and a relay
    /// that can hold the lists and watches by label of `resource` (a path
    /// holding `/{resource}?`).
    pub async fn start(resource: &str) -> LaggingWatch {
        let (_, admin) = super::kubeconfig_env();
        let mut proxy = tokio::process::Command::new("kubectl")
            .args(["proxy", "--port=0", "--kubeconfig", &admin])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start kubectl proxy: {e}; {}", super::TESTBED_HINT));
        // "Starting to serve on 127.0.0.1:PORT"
        let mut line = String::new();
        tokio::io::BufReader::new(proxy.stdout.take().expect("kubectl proxy stdout"))
            .read_line(&mut line)
            .await
            .expect("read kubectl proxy's address");
        let upstream = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| panic!("kubectl proxy said {line:?}, not its address"))
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = Arc::new(watch::channel(false).0);
        let marker = format!("/{resource}?");
        let task = tokio::spawn({
            let held = held.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let reading = Arc::new(AtomicBool::new(false));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(relay(client_read, server_write, {
                        let (marker, reading) = (marker.clone(), reading.clone());
                        move |chunk| {
                            if let Some(reads) = starts_request(chunk, &marker) {
                                reading.store(reads, Ordering::SeqCst);
                            }
                            None
                        }
                    }));
                    let held = held.subscribe();
                    tokio::spawn(relay(server_read, client_write, move |_| {
                        reading.load(Ordering::SeqCst).then(|| held.clone())
                    }));
                }
            }
        });
        let dir = tempfile::tempdir().expect("kubeconfig dir");
        let kubeconfig = dir.path().join("lagging.kubeconfig");
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "relay", "cluster": {"server": format!("http://{addr}")}}],
            "users": [{"name": "relay", "user": {}}],
            "contexts": [{"name": "relay", "context": {"cluster": "relay", "user": "relay"}}],
            "current-context": "relay",
        });
        std::fs::write(&kubeconfig, serde_yaml::to_string(&config).unwrap()).unwrap();
        LaggingWatch {
            held,
            task,
            _proxy: proxy,
            _dir: dir,
            kubeconfig,
        }
    }

    /// `KUBECONFIG` for [`Bed::start_controller`](super::controller::Bed::start_controller):
    /// a kubeconfig whose server is the relay (plain HTTP; `kubectl proxy`
    /// signs in as the bed's admin).
    pub fn env(&self) -> (&'static str, &str) {
        ("KUBECONFIG", self.kubeconfig.to_str().expect("UTF-8 path"))
    }

    /// Holds what the resource's lists and watches deliver from now on.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Delivers what was held, and everything after.
    pub fn release(&self) {
        self.held.send_replace(false);
    }
}

impl Drop for LaggingWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a chunk a client sent starts a request, and if so whether that
/// request lists or watches the resource by label (a GET whose request line
/// holds `marker` and a label selector).
fn starts_request(chunk: &[u8], marker: &str) -> Option<bool> {
    const METHODS: [&str; 5] = ["GET ", "POST ", "PUT ", "PATCH ", "DELETE "];
    let chunk = String::from_utf8_lossy(chunk);
    METHODS.iter().any(|m| chunk.starts_with(m)).then(|| {
        let line = chunk.lines().next().unwrap_or_default();
        line.starts_with("GET ") && line.contains(marker) && line.contains("labelSelector=")
    })
}
