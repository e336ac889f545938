//! A throw-away `nats-server` on a free loopback port, configured like the
//! deploy files: log-ins required, only natter's user may publish events.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// natter's user: publishes and subscribes on natter.events.> and
/// natter.caches.>, nothing else (as in deploy/k8s/dev/nats.conf), and the
/// same under [`OTHER_PREFIX`].
pub(crate) const NATTER_USER: &str = "natter";
/// The subject prefix of a second deployment on the same server, whose
/// subjects natter's user is granted too (as a staging deployment beside
/// production with one NATS user would be).
pub(crate) const OTHER_PREFIX: &str = "staging.natter";
/// A user of the same server that may read events but publish only on its
/// own subjects.
pub(crate) const INTRUDER_USER: &str = "intruder";
/// A user allowed to publish events although it is not natter: the control
/// that shows a forged event would be noticed.
pub(crate) const RELAY_USER: &str = "relay";

/// A running nats-server; killed when dropped.
pub(crate) struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:<port>`, no credentials.
    pub(crate) url: String,
    /// The password of every user (one per test server).
    pub(crate) password: String,
    binary: PathBuf,
    dir: tempfile::TempDir,
    /// This test's turn (a guard of [`TURNS`]): shared with other tests, or
    /// alone; held until the server is dropped.
    _turn: Box<dyn std::any::Any + Send + Sync>,
}

/// Tests run in parallel threads of one process, and a callsite's interest
/// is computed once, when the first thread reaches it: a test that
/// captures the client's logs with a subscriber of its own thread misses
/// lines whose callsites another test's thread was registering meanwhile.
/// Such a test runs alone ([`NatsServer::start_alone`]); every other test
/// holds a shared turn while its server runs.
static TURNS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The nats-server binary: on PATH, else Debian's /usr/sbin/nats-server.
fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
}

impl NatsServer {
    /// Starts a server; `None` (the test skips) only when nats-server is not
    /// installed and CI is unset. Panics in CI without it.
    pub(crate) async fn start() -> Option<Self> {
        Self::start_taking(Box::new(TURNS.read().await)).await
    }

    /// As [`NatsServer::start`], once no other test's server runs, and none
    /// starts until this one is dropped: for tests that capture logs.
    pub(crate) async fn start_alone() -> Option<Self> {
        Self::start_taking(Box::new(TURNS.write().await)).await
    }

    async fn start_taking(turn: Box<dyn std::any::Any + Send + Sync>) -> Option<Self> {
        let Some(binary) = binary() else {
            assert!(std::env::var_os("CI").is_none(), "CI must have nats-server installed (on PATH or /usr/sbin)");
            eprintln!("skipped: nats-server is not installed");
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        // Letters first: the server parses an unquoted value starting with a
        // digit as a number (see deploy/README.md on generating one).
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        let (child, port) = spawn(&binary, dir.path(), &password, "-1").await;
        Some(Self { child, url: format!("nats://127.0.0.1:{port}"), password, binary, dir, _turn: turn })
    }

    /// Stops the server and starts it again on the same port (its clients
    /// reconnect); returns once it listens.
    pub(crate) async fn restart(&mut self) {
        let _ = self.child.kill().await;
        let port = self.url.rsplit(':').next().expect("a port").to_owned();
        (self.child, _) = spawn(&self.binary, self.dir.path(), &self.password, &port).await;
    }

    /// Writes `content` to a file in the server's temp dir; returns its path.
    pub(crate) fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).expect("write file");
        path
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Starts nats-server with natter's test config, listening on `port` (`-1`:
/// one it picks); returns it and the port it logged.
/// Starts nats-server with the test config, listening on `port` (`-1`: one
/// it picks); returns it and the port it logged.
async fn spawn(binary: &Path, dir: &Path, password: &str, port: &str) -> (Child, String) {
    let config = dir.join("nats.conf");
    std::fs::write(&config, config_text(password, port)).expect("write nats.conf");
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start nats-server");
    // The server logs the port it listens on.
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let port = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("read nats-server log") {
            if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
                return addr.trim().rsplit(':').next().map(str::to_owned);
            }
        }
        None
    })
    .await
    .expect("nats-server started within 20s")
    .expect("nats-server logged its client port");
    // Keep draining the log so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, port)
}

fn config_text(password: &str, port: &str) -> String {
    format!(
        r#"
listen: "127.0.0.1:{port}"
authorization {{
  users = [
    {{
      user: "{NATTER_USER}", password: "{password}"
      permissions {{
        publish: {{ allow: ["natter.events.>", "natter.caches.>", "{OTHER_PREFIX}.events.>", "{OTHER_PREFIX}.caches.>"] }}
        subscribe: {{ allow: ["natter.events.>", "natter.caches.>", "{OTHER_PREFIX}.events.>", "{OTHER_PREFIX}.caches.>"] }}
      }}
    }}
    {{
      user: "{INTRUDER_USER}", password: "{password}"
      permissions {{
        publish: {{ allow: ["intruder.>"] }}
        subscribe: {{ allow: ["natter.events.>", "intruder.>"] }}
      }}
    }}
    {{
      user: "{RELAY_USER}", password: "{password}"
      permissions {{
        publish: {{ allow: ["natter.events.>"] }}
      }}
    }}
  ]
}}
"#
    )
}
