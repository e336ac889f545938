//! Traces and logs as an operator meets them: `natter` processes exporting
//! to a real OTLP receiver in this test ([`natter_testkit::otlp`]), their
//! log lines read from stdout.

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use natter_proto::messages::v1::{self as mpb, message_service_client::MessageServiceClient};
use natter_proto::sessions::v1::{self as spb, session_service_client::SessionServiceClient};
use natter_testkit::otlp::{Collector, attr_int, attr_of, attr_str, describe, traceparent};
use tonic::transport::Channel;

use super::{credential_file, drop_schemas, env, free_port, healthy, user};

/// A `natter` process whose log lines (JSON, on stdout) the test reads.
struct Proc {
    child: Child,
    port: u16,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// `natter <args> --listen 127.0.0.1:<port> --log-format json`, logging
    /// at info, exporting spans after at most 100 ms.
    fn start(args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>, port: u16) -> Self {
        Self::start_with(args, port, None)
    }

    /// [`Proc::start`] with `OTEL_RESOURCE_ATTRIBUTES` set to `resource`
    /// (unset when `None`, whatever the test's environment says).
    fn start_with(
        args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
        port: u16,
        resource: Option<&str>,
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_natter"));
        match resource {
            Some(attributes) => command.env("OTEL_RESOURCE_ATTRIBUTES", attributes),
            None => command.env_remove("OTEL_RESOURCE_ATTRIBUTES"),
        };
        let mut child = command
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--log-format", "json"])
            .env("RUST_LOG", "info")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start natter");
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.0.lock().unwrap().push(line);
                sink.1.notify_all();
            }
        });
        Self { child, port, lines, reader: Some(reader) }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The first log line satisfying `want`, waiting at most 20 s for it.
    fn wait_line(&self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (lines, arrived) = &*self.lines;
        let mut lines = lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|l| want(l)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no such log line; the lines so far:\n{}", lines.join("\n"));
            lines = arrived.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// The log lines at WARN or above so far.
    fn warnings(&self) -> Vec<String> {
        let lines = self.lines.0.lock().unwrap();
        lines.iter().filter(|l| l.contains(r#""level":"WARN""#) || l.contains(r#""level":"ERROR""#)).cloned().collect()
    }

    /// Stops the process with SIGTERM and waits for it to exit with 0 and
    /// for its last log line.
    fn terminate(mut self) -> Vec<String> {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
        let status = self.child.wait().expect("reaped");
        assert!(status.success(), "natter exited with {status} on SIGTERM");
        // stdout closed at exit: the reader ends once it has every line.
        self.reader.take().unwrap().join().expect("log reader");
        self.warnings()
    }

    /// A channel once the process answers health (at most 15 s).
    async fn channel(&self) -> Channel {
        let log = || self.lines.0.lock().unwrap().join("\n");
        healthy(&self.url())
            .await
            .unwrap_or_else(|| panic!("{} did not become healthy; its log:\n{}", self.url(), log()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `message` with a fresh `traceparent`; its trace id.
fn traced<T>(message: T) -> (tonic::Request<T>, Vec<u8>) {
    let (header, trace_id, _) = traceparent();
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("traceparent", header.parse().unwrap());
    (request, trace_id)
}

/// OTLP span kinds and status codes (opentelemetry-proto's enums).
const SPAN_KIND_SERVER: i32 = 2;
const SPAN_KIND_CLIENT: i32 = 3;
const STATUS_CODE_ERROR: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_that_is_down_is_named_by_a_client_span_and_one_warning() {
    let Some(db) = env("NATTER_TEST_DATABASE_URL") else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let prefix = format!("o{}_", uuid::Uuid::new_v4().simple());
    let secrets = tempfile::tempdir().unwrap();
    let credential = credential_file(secrets.path());
    let (sessions_internal, chats_down) = (free_port(), free_port());
    let common = |internal: u16| {
        vec![
            "--database-url".to_owned(),
            db.clone(),
            "--database-schema-prefix".into(),
            prefix.clone(),
            "--internal-listen".into(),
            format!("127.0.0.1:{internal}"),
            "--service-credential-file".into(),
            credential.clone(),
            "--otlp-endpoint".into(),
            endpoint.clone(),
        ]
    };
    let args = |component: &str, internal: u16, more: &[String]| {
        let mut all = vec![component.to_owned()];
        all.extend(common(internal));
        all.extend_from_slice(more);
        all
    };
    let sessions = Proc::start(args("sessions", sessions_internal, &[]), free_port());
    // The chats service is down: nothing listens on its URL.
    let chats_url = format!("http://127.0.0.1:{chats_down}");
    let messages_args = args(
        "messages",
        free_port(),
        &["--sessions-url".into(), format!("http://127.0.0.1:{sessions_internal}"), "--chats-url".into(), chats_url],
    );
    let messages = Proc::start(messages_args, free_port());
    let (_, token) = user(&sessions.channel().await, "tracy").await;

    let send =
        mpb::SendMessageRequest { chat_id: uuid::Uuid::now_v7().to_string(), text: "hi".into(), ..Default::default() };
    let (mut request, trace_id) = traced(send);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let refused = MessageServiceClient::new(messages.channel().await).send_message(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let membership = "natter.chats.v1.ChatInternalService/CheckMembership";
    let spans = collector
        .wait_for(&trace_id, |spans| {
            spans.iter().any(|s| s.name == membership) && spans.iter().any(|s| s.name.ends_with("/SendMessage"))
        })
        .await;
    let send = spans.iter().find(|s| s.name.ends_with("/SendMessage")).unwrap();
    let client = spans.iter().find(|s| s.name == membership).unwrap();
    assert_eq!((send.kind, client.kind), (SPAN_KIND_SERVER, SPAN_KIND_CLIENT), "{}", describe(client));
    assert_eq!(attr_str(client, "rpc.system"), Some("grpc"));
    assert_eq!(attr_str(client, "rpc.service"), Some("natter.chats.v1.ChatInternalService"));
    assert_eq!(attr_str(client, "rpc.method"), Some("CheckMembership"));
    assert_eq!(attr_str(client, "server.address"), Some(format!("127.0.0.1:{chats_down}").as_str()));
    assert_eq!(attr_int(client, "rpc.grpc.status_code"), Some(14), "UNAVAILABLE");
    let status = client.status.as_ref().expect("a status");
    assert_eq!(status.code, STATUS_CODE_ERROR);
    assert!(!status.message.is_empty(), "the reason is recorded");
    // The client span is a hop below the messages service's SendMessage.
    let mut parent = client.parent_span_id.clone();
    while parent != send.span_id {
        parent = spans.iter().find(|s| s.span_id == parent).expect("an ancestor in the trace").parent_span_id.clone();
    }

    // One WARN line names the dependency; a second failure within the
    // minute adds none.
    let warning = messages.wait_line(|l| l.contains(r#""level":"WARN""#) && l.contains(&format!(":{chats_down}")));
    assert!(warning.contains("UNAVAILABLE") || warning.contains("Unavailable"), "{warning}");
    assert!(warning.contains(r#""suppressed":0"#), "the first warning held none back: {warning}");
    let send = mpb::SendMessageRequest {
        chat_id: uuid::Uuid::now_v7().to_string(),
        text: "again".into(),
        ..Default::default()
    };
    let mut request = tonic::Request::new(send);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    MessageServiceClient::new(messages.channel().await).send_message(request).await.unwrap_err();
    let named = |l: &String| l.contains(&format!(":{chats_down}"));
    assert_eq!(messages.warnings().iter().filter(|l| named(l)).count(), 1, "{:#?}", messages.warnings());
    drop(messages);
    drop(sessions);
    drop_schemas(&db, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_not_traced_and_each_replica_has_its_own_instance_id() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // The second replica asks for health checks to be traced, and has a
    // resource attribute of its own from the SDK's variable.
    let extras = [(None, None), (Some("--trace-health-checks"), Some("deployment.environment=staging"))];
    let replicas: Vec<Proc> = dirs
        .iter()
        .zip(extras)
        .map(|(dir, (flag, resource))| {
            let data = dir.path().display().to_string();
            let mut args = vec!["serve", "--data-dir", &data, "--otlp-endpoint", &endpoint];
            args.extend(flag);
            Proc::start_with(args, free_port(), resource)
        })
        .collect();
    let mut resources = Vec::new();
    for (replica, traces_health) in replicas.iter().zip([false, true]) {
        let channel = replica.channel().await;
        // A traced health check, then a traced call: the call's span comes
        // after the check's would have, through the same exporter.
        let (check, health_trace) = traced(tonic_health::pb::HealthCheckRequest { service: String::new() });
        tonic_health::pb::health_client::HealthClient::new(channel.clone()).check(check).await.unwrap();
        let (call, call_trace) = traced(spb::GetCurrentSessionRequest {});
        let refused = SessionServiceClient::new(channel).get_current_session(call).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let received = collector.wait_for_received(&call_trace, |spans| !spans.is_empty()).await;
        if traces_health {
            let check = collector.wait_for(&health_trace, |spans| !spans.is_empty()).await;
            assert_eq!(check[0].name, "grpc.health.v1.Health/Check", "{}", describe(&check[0]));
        } else {
            assert!(collector.received(&health_trace).is_empty(), "a health check was traced");
        }
        let resource = received[0].resource.clone();
        let instance = attr_of(&resource, "service.instance.id").expect("an instance id");
        assert!(instance.ends_with(&format!(":{}", replica.port)), "host name and listen port: {instance}");
        resources.push(resource);
    }
    let instance = |resource| attr_of(resource, "service.instance.id");
    assert_ne!(instance(&resources[0]), instance(&resources[1]), "two replicas tell themselves apart");
    // The SDK's variable still applies beside the default instance id.
    assert_eq!(attr_of(&resources[1], "deployment.environment"), Some("staging"));
    assert_eq!(attr_of(&resources[0], "deployment.environment"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_otlp_endpoint_is_refused_and_an_unreachable_one_warns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(["serve", "--data-dir", &data, "--listen", "127.0.0.1:0", "--otlp-endpoint", "collector:4317"])
        .output()
        .expect("run natter");
    assert!(!output.status.success(), "started with a bad endpoint");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--otlp-endpoint"), "the error names the flag: {stderr}");

    let nobody = format!("http://127.0.0.1:{}", free_port());
    let natter = Proc::start(["serve", "--data-dir", &data, "--otlp-endpoint", &nobody], free_port());
    let (call, _) = traced(spb::GetCurrentSessionRequest {});
    SessionServiceClient::new(natter.channel().await).get_current_session(call).await.unwrap_err();
    let warning = natter.wait_line(|l| l.contains(r#""level":"WARN""#) && l.contains("exporting spans"));
    assert!(warning.contains(&nobody), "the warning names the endpoint: {warning}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_logs_no_warning() {
    let Some(nats) = env("NATTER_TEST_NATS_URL") else {
        eprintln!("skipped: NATTER_TEST_NATS_URL is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    // Subjects of its own: another test's process dying on the same NATS
    // server is none of its business.
    let subjects = super::nats_subjects(&format!("d{}", uuid::Uuid::new_v4().simple()));
    let natter = Proc::start(
        ["serve", "--data-dir", &data, "--nats-url", &nats, "--nats-subject-prefix", &subjects],
        free_port(),
    );
    natter.channel().await;
    natter.wait_line(|l| l.contains("nats"));
    assert_eq!(natter.terminate(), Vec::<String>::new(), "no WARN or ERROR line");

    // The same for a split service, on PostgreSQL and NATS, after a call.
    let Some(db) = env("NATTER_TEST_DATABASE_URL") else {
        eprintln!("split service skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    let prefix = format!("q{}_", uuid::Uuid::new_v4().simple());
    let internal = format!("127.0.0.1:{}", free_port());
    let credential = credential_file(dir.path());
    let sessions = Proc::start(
        [
            "sessions",
            "--database-url",
            &db,
            "--database-schema-prefix",
            &prefix,
            "--nats-url",
            &nats,
            "--nats-subject-prefix",
            &super::nats_subjects(&prefix),
            "--internal-listen",
            &internal,
            "--service-credential-file",
            &credential,
        ],
        free_port(),
    );
    user(&sessions.channel().await, "leaving").await;
    sessions.wait_line(|l| l.contains("nats"));
    assert_eq!(sessions.terminate(), Vec::<String>::new(), "no WARN or ERROR line from the split service");
    drop_schemas(&db, &prefix).await;
}
