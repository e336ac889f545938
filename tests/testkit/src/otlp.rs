//! An OTLP/gRPC trace receiver for tests: a real collector endpoint on an
//! ephemeral port that keeps every span it is sent, with the attributes of
//! the resource (the process) that sent it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
pub use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::Notify;

/// A span as received: the span and its resource's attributes.
#[derive(Clone, Debug)]
pub struct Received {
    /// `service.name`, `service.instance.id`, ... of the process.
    pub resource: Vec<KeyValue>,
    /// The span.
    pub span: Span,
}

/// See the module docs. Clones share the spans.
#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received { resource: resource.clone(), span });
            }
        }
        self.spans.lock().unwrap().extend(received);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on an ephemeral port until the test's runtime ends; the
    /// collector's URL (`http://127.0.0.1:port`, an `--otlp-endpoint`).
    pub async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(server);
        url
    }

    /// Every span of `trace_id` received so far, with its resource.
    pub fn received(&self, trace_id: &[u8]) -> Vec<Received> {
        self.spans.lock().unwrap().iter().filter(|r| r.span.trace_id == trace_id).cloned().collect()
    }

    /// Waits (at most 20 s) until the spans of `trace_id` satisfy `done`;
    /// returns them with their resources. Panics with the spans so far.
    pub async fn wait_for_received(&self, trace_id: &[u8], done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                let spans = self.received(trace_id);
                if done(&spans) {
                    return spans;
                }
                arrived.await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(20), wait).await {
            Ok(spans) => spans,
            Err(_) => {
                let spans: Vec<_> = self.received(trace_id).iter().map(|r| describe(&r.span)).collect();
                panic!("the trace never completed; its spans so far: {spans:#?}")
            }
        }
    }

    /// [`Collector::wait_for_received`], the spans alone.
    pub async fn wait_for(&self, trace_id: &[u8], done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let spans = self
            .wait_for_received(trace_id, |received| done(&received.iter().map(|r| r.span.clone()).collect::<Vec<_>>()))
            .await;
        spans.into_iter().map(|r| r.span).collect()
    }
}

/// The value of attribute `key`, if any.
pub fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

/// The string attribute `key` of `attributes`.
pub fn attr_of<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// The string attribute `key` of `span`.
pub fn attr_str<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    attr_of(&span.attributes, key)
}

/// The integer attribute `key` of `span`.
pub fn attr_int(span: &Span, key: &str) -> Option<i64> {
    match attr(&span.attributes, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// `name span=<id> parent=<id>`, for failure messages.
pub fn describe(span: &Span) -> String {
    format!("{} span={} parent={}", span.name, hex(&span.span_id), hex(&span.parent_span_id))
}

/// Lower-case hex of `bytes` (trace and span ids as W3C writes them).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh W3C `traceparent` (sampled) and its trace id and parent span id.
pub fn traceparent() -> (String, Vec<u8>, Vec<u8>) {
    let ids = uuid::Uuid::new_v4();
    let (trace_id, span_id) = (ids.as_bytes().to_vec(), ids.as_bytes()[..8].to_vec());
    (format!("00-{}-{}-01", hex(&trace_id), hex(&span_id)), trace_id, span_id)
}
