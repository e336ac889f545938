//! A minimal gRPC-web client over HTTP/1.1, as a browser speaks it, to prove
//! the wire format without any gRPC library on the client side.

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// What a gRPC-web unary call returned.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status (200 for any gRPC outcome).
    pub http_status: u16,
    /// The Access-Control-Allow-Origin header, if any.
    pub allow_origin: Option<String>,
    /// The response message bytes (the first data frame), if any.
    pub message: Option<Bytes>,
    /// grpc-status from the trailer frame (or headers for trailers-only).
    pub grpc_status: Option<String>,
}

/// POSTs one `application/grpc-web+proto` call over HTTP/1.1 to
/// `http://addr/path` with an `Origin` header, and decodes the framed reply.
pub async fn unary(
    addr: std::net::SocketAddr,
    path: &str,
    message: &impl prost::Message,
    token: Option<&str>,
) -> Reply {
    unary_with(addr, path, message, token, &[]).await
}

/// As [`unary`], with `headers` (name, value) added to the request (a
/// `grpc-timeout`, as grpc-web clients send one).
pub async fn unary_with(
    addr: std::net::SocketAddr,
    path: &str,
    message: &impl prost::Message,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> Reply {
    let payload = message.encode_to_vec();
    let mut body = BytesMut::with_capacity(5 + payload.len());
    body.extend_from_slice(&[0]);
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&payload);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", "http://page.example");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.freeze())).expect("request");
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client.request(request).await.expect("gRPC-web call");
    let http_status = response.status().as_u16();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let allow_origin = header("access-control-allow-origin");
    let mut grpc_status = header("grpc-status");
    let mut data = response.into_body().collect().await.expect("body").to_bytes();
    let mut message = None;
    while data.len() >= 5 {
        let flag = data[0];
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        data.advance(5);
        let frame = data.split_to(len.min(data.len()));
        if flag & 0x80 != 0 {
            let trailers = String::from_utf8_lossy(&frame).to_string();
            for line in trailers.split("\r\n") {
                if let Some((k, v)) = line.split_once(':')
                    && k.trim().eq_ignore_ascii_case("grpc-status")
                {
                    grpc_status = Some(v.trim().to_owned());
                }
            }
        } else if message.is_none() {
            message = Some(frame);
        }
    }
    Reply { http_status, allow_origin, message, grpc_status }
}
