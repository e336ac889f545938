//! Observability: one SendMessage through the edge is one trace across the
//! split services, received by a real OTLP collector; the Prometheus
//! endpoint counts and times RPCs.
//!
//! The OpenTelemetry exporter and the tracing subscriber are global to a
//! process, and the test cluster runs every service in this one test
//! process, so the spans of all services arrive under one `service.name`
//! (each real binary sets its own); the test tells the hops apart by their
//! parent links and RPC names, and picks its call's spans out of whatever
//! concurrent tests send by the trace id it started itself.

use std::time::Duration;

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_proto::sessions::v1 as spb;
use natter_testkit::otlp::{Collector, Span, attr_int, attr_str, describe, hex};
use natter_testkit::{Cluster, authed, with_token};
use opentelemetry_proto::tonic::common::v1::AnyValue;

/// OTLP span kinds (opentelemetry-proto's `SpanKind`).
const SPAN_KIND_SERVER: i32 = 2;
const SPAN_KIND_CLIENT: i32 = 3;

/// The server span of the RPC `method` (e.g. `SendMessage`).
fn is_rpc(span: &Span, method: &str) -> bool {
    span.name.ends_with(&format!("/{method}")) && attr_str(span, "rpc.system") == Some("grpc")
}

fn value_text(value: &AnyValue) -> String {
    format!("{:?}", value.value)
}

/// Whether `ancestor` is `span`'s parent, grandparent, ... within `spans`.
fn descends_from(spans: &[Span], span: &Span, ancestor: &Span) -> bool {
    let mut parent = span.parent_span_id.clone();
    for _ in 0..spans.len() {
        if parent == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|s| s.span_id == parent) {
            Some(p) => parent = p.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

/// The hops of one SendMessage through the edge, once all have arrived:
/// (edge span, messages span).
fn send_hops<'a>(spans: &'a [Span], root_span_id: &[u8]) -> Option<(&'a Span, &'a Span)> {
    let edge = spans.iter().find(|s| is_rpc(s, "SendMessage") && s.parent_span_id == root_span_id)?;
    // The edge's client span of its forward, then the messages service's
    // server span below it.
    let forward = spans
        .iter()
        .find(|s| is_rpc(s, "SendMessage") && s.kind == SPAN_KIND_CLIENT && s.parent_span_id == edge.span_id)?;
    let messages = spans
        .iter()
        .find(|s| is_rpc(s, "SendMessage") && s.kind == SPAN_KIND_SERVER && s.parent_span_id == forward.span_id)?;
    let below = |method| {
        spans.iter().any(|s| is_rpc(s, method) && s.kind == SPAN_KIND_SERVER && descends_from(spans, s, messages))
    };
    (below("IntrospectSession") && below("CheckMembership") && below("RecordActivity")).then_some((edge, messages))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_message_is_one_trace_across_services() {
    let Some(url) = natter_testkit::postgres_url() else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    let collector = Collector::default();
    let endpoint = collector.start().await;
    // What `natter_kit::telemetry::init` does for --otlp-endpoint, with a
    // short batch delay and no log lines.
    let telemetry = natter_kit::telemetry::Builder::new("natter-e2e")
        .logs(false)
        .otlp_endpoint(Some(endpoint))
        .batch_delay(Duration::from_millis(50))
        .install()
        .expect("telemetry starts");
    assert!(natter_kit::telemetry::exporting(), "this test is the only one that installs a subscriber");

    let c = Cluster::split(&url, &[]).await;
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let request = cpb::CreateChatRequest { member_ids: vec![bob.id.clone()], ..Default::default() };
    let chat = c.chats().create_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();

    // The client's own span: a W3C traceparent the edge continues.
    let ids = uuid::Uuid::new_v4();
    let (trace_id, root_span_id) = (ids.as_bytes().to_vec(), ids.as_bytes()[..8].to_vec());
    let text = format!("the secret plans {}", uuid::Uuid::new_v4().simple());
    let mut request = with_token(
        &alice.token,
        mpb::SendMessageRequest { chat_id: chat.id.clone(), text: text.clone(), ..Default::default() },
    );
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&root_span_id));
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let sent = c.messages().send_message(request).await.unwrap().into_inner().message.unwrap();

    let spans = collector.wait_for(&trace_id, |spans| send_hops(spans, &root_span_id).is_some()).await;
    let (edge, messages) = send_hops(&spans, &root_span_id).unwrap();
    assert_eq!(edge.name, "natter.messages.v1.MessageService/SendMessage");
    assert_eq!(attr_str(edge, "rpc.service"), Some("natter.messages.v1.MessageService"));
    assert_eq!(attr_str(edge, "rpc.method"), Some("SendMessage"));
    for hop in [edge, messages] {
        assert_eq!(attr_int(hop, "rpc.grpc.status_code"), Some(0), "{}", describe(hop));
    }
    // Token introspection (sessions) and the membership check (chats) are
    // hops below the messages service, in the same trace.
    // Each is a client span of the caller (naming the callee's address)
    // whose child is the callee's server span.
    for method in ["IntrospectSession", "CheckMembership"] {
        let hop = spans.iter().find(|s| is_rpc(s, method) && s.kind == SPAN_KIND_SERVER).unwrap();
        assert!(descends_from(&spans, hop, messages), "{method} is below SendMessage: {}", describe(hop));
        assert_eq!(attr_int(hop, "rpc.grpc.status_code"), Some(0));
        let client = spans.iter().find(|s| s.span_id == hop.parent_span_id).expect("the caller's span");
        assert_eq!(client.kind, SPAN_KIND_CLIENT, "{}", describe(client));
        assert_eq!(client.name, hop.name);
        assert!(attr_str(client, "server.address").is_some_and(|a| a.starts_with("127.0.0.1:")), "{client:?}");
        assert_eq!(attr_int(client, "rpc.grpc.status_code"), Some(0));
    }
    // The domain span names the chat and the seq the message got.
    let send = spans.iter().find(|s| s.name == "send" && s.parent_span_id == messages.span_id).expect("send span");
    assert_eq!(attr_str(send, "chat_id"), Some(chat.id.as_str()));
    assert_eq!(attr_int(send, "seq"), Some(sent.seq));

    // Nothing exported carries the bearer token or the message text.
    for span in &spans {
        let values = span.attributes.iter().chain(span.events.iter().flat_map(|e| &e.attributes));
        for kv in values {
            let value = kv.value.as_ref().map(value_text).unwrap_or_default();
            for secret in [alice.token.as_str(), text.as_str()] {
                assert!(!value.contains(secret), "{} carries a secret in {}", describe(span), kv.key);
            }
        }
        assert!(!span.name.contains(&alice.token) && !span.name.contains(&text));
    }

    c.stop().await;

    // The all-in-one draws the same hops: its in-process calls are client
    // spans too, naming no address but `in-process`.
    let c = Cluster::all_in_one(&[]).await;
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let request = cpb::CreateChatRequest { member_ids: vec![bob.id.clone()], ..Default::default() };
    let chat = c.chats().create_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();
    let ids = uuid::Uuid::new_v4();
    let (trace_id, root_span_id) = (ids.as_bytes().to_vec(), ids.as_bytes()[..8].to_vec());
    let mut request =
        with_token(&alice.token, mpb::SendMessageRequest { chat_id: chat.id, text: "hi".into(), ..Default::default() });
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&root_span_id));
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    c.messages().send_message(request).await.unwrap();
    let in_process = |s: &Span| s.kind == SPAN_KIND_CLIENT && attr_str(s, "server.address") == Some("in-process");
    let spans = collector
        .wait_for(&trace_id, |spans| {
            // The server span ends (and is exported) after its children.
            spans.iter().any(|s| is_rpc(s, "SendMessage") && s.parent_span_id == root_span_id)
                && ["IntrospectSession", "CheckMembership"]
                    .iter()
                    .all(|m| spans.iter().any(|s| is_rpc(s, m) && in_process(s)))
        })
        .await;
    let send = spans.iter().find(|s| is_rpc(s, "SendMessage") && s.parent_span_id == root_span_id).unwrap();
    for method in ["IntrospectSession", "CheckMembership"] {
        let client = spans.iter().find(|s| is_rpc(s, method) && in_process(s)).unwrap();
        assert!(descends_from(&spans, client, send), "{method} is below SendMessage: {}", describe(client));
        assert_eq!(attr_int(client, "rpc.grpc.status_code"), Some(0));
    }
    c.stop().await;
    telemetry.shutdown();
}

/// The value of the sample `name{labels}` in a Prometheus text exposition
/// (0 when absent); `labels` are `key="value"` pairs, all of which must match.
fn sample(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series.split_once('{').map_or(*series == name, |(n, rest)| {
                n == name && labels.iter().all(|kv| rest.trim_end_matches('}').split(',').any(|p| p == *kv))
            })
        })
        .map(|(_, value)| value.parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_and_times_rpcs() {
    let c = Cluster::all_in_one(&[]).await;
    // What `natter_kit::telemetry::init` starts for --metrics-listen (the
    // registry is per process, so it covers the server above).
    let metrics = natter_kit::metrics::serve_on("127.0.0.1:0".parse().unwrap()).expect("metrics endpoint");
    let addr = metrics.local_addr();
    let user = c.user("metered").await;

    let ok = [r#"service="natter.sessions.v1.SessionService""#, r#"method="GetCurrentSession""#, r#"code="OK""#];
    let denied = [
        r#"service="natter.sessions.v1.SessionService""#,
        r#"method="GetCurrentSession""#,
        r#"code="UNAUTHENTICATED""#,
    ];
    let timed = [r#"service="natter.sessions.v1.SessionService""#, r#"method="GetCurrentSession""#];
    let (status, before) = natter_testkit::http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        c.sessions().get_current_session(authed(&user, spb::GetCurrentSessionRequest {})).await.unwrap();
    }
    let refused = c.sessions().get_current_session(with_token("not-a-token", spb::GetCurrentSessionRequest {})).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    // A send goes through the message writer: its commit and its answer are
    // charged to their phases. The writer charges a batch's answer after the
    // replies have left, so the first reply can arrive before that; the
    // second send's reply leaves only after the writer has finished the
    // first batch, answer included (one thread, one batch at a time).
    let request = cpb::CreateChatRequest { title: "metered".into(), ..Default::default() };
    let chat_id = c.chats().create_chat(authed(&user, request)).await.unwrap().into_inner().chat.unwrap().id;
    for text in ["metered", "and after it"] {
        let request = mpb::SendMessageRequest { chat_id: chat_id.clone(), text: text.into(), ..Default::default() };
        c.messages().send_message(authed(&user, request)).await.unwrap();
    }

    let (status, after) = natter_testkit::http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    // Other tests in this process may add calls of their own: at least.
    let grew = |name, labels: &[&str]| sample(&after, name, labels) - sample(&before, name, labels);
    assert!(grew("natter_rpc_requests_total", &ok) >= 3.0, "{after}");
    assert!(grew("natter_rpc_requests_total", &denied) >= 1.0, "{after}");
    assert!(grew("natter_rpc_duration_seconds_count", &timed) >= 4.0, "{after}");
    assert!(sample(&after, "natter_rpc_duration_seconds_sum", &timed) > 0.0);
    for phase in ["commit", "answer"] {
        let label = format!(r#"phase="{phase}""#);
        assert!(grew("natter_writer_seconds_total", &[&label]) > 0.0, "the writer's {phase} time grew: {after}");
    }
    for name in [
        "natter_active_streams",
        "natter_store_batch_size",
        "natter_store_commit_seconds",
        "natter_bus_published_total",
        "natter_bus_received_total",
        "natter_writer_seconds_total",
    ] {
        assert!(after.contains(&format!("# TYPE {name} ")), "{name} is exposed");
    }
    assert_eq!(natter_testkit::http_get(addr, "/nothing").await.0, 404);

    drop(metrics);
    c.stop().await;
}
