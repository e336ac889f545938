//! natter's edge: the one port browsers and terminals use in split mode.
//!
//! It accepts gRPC and gRPC-web (HTTP/1.1 and HTTP/2, CORS) with the same
//! layer stack as every natter server, and forwards each call, by the
//! service prefix of its path, to the upstream service over HTTP/2. Message
//! bodies are streamed through both ways and never decoded, so the edge
//! needs no knowledge of the API beyond three path prefixes; internal
//! services (`*InternalService`) are not routed. Health and reflection are
//! answered by the edge itself.

use std::convert::Infallible;

use axum::body::Body;
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use natter_kit::{Server, ServerArgs};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Command line of `natter-edge`.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "natter-edge",
    version,
    about = "natter's edge: forwards gRPC and gRPC-web calls to the natter services"
)]
pub struct EdgeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// URL of the sessions service (http://host:port).
    #[arg(long, env = "NATTER_SESSIONS_URL")]
    pub sessions_url: String,
    /// URL of the chats service.
    #[arg(long, env = "NATTER_CHATS_URL")]
    pub chats_url: String,
    /// URL of the messages service.
    #[arg(long, env = "NATTER_MESSAGES_URL")]
    pub messages_url: String,
    /// Directory of the browser page, served at `/`; missing: API only.
    #[arg(long, env = "NATTER_WEB_DIR", default_value = "web/dist")]
    pub web_dir: std::path::PathBuf,
}

/// One route: calls whose path starts with `prefix` go to `upstream`.
#[derive(Clone, Debug)]
struct Route {
    prefix: &'static str,
    upstream: Uri,
}

/// The forwarding service behind the edge's own health and reflection.
#[derive(Clone)]
struct Forward {
    routes: std::sync::Arc<[Route]>,
    client: Client<HttpConnector, Body>,
}

impl Forward {
    fn new(args: &EdgeArgs) -> anyhow::Result<Self> {
        let parse = |name: &str, url: &str| -> anyhow::Result<Uri> {
            let uri: Uri = url.parse().map_err(|e| anyhow::anyhow!("--{name}-url {url:?}: {e}"))?;
            anyhow::ensure!(
                uri.scheme_str() == Some("http") && uri.authority().is_some(),
                "--{name}-url must be http://host:port"
            );
            Ok(uri)
        };
        let routes = vec![
            Route { prefix: "/natter.sessions.v1.SessionService/", upstream: parse("sessions", &args.sessions_url)? },
            Route { prefix: "/natter.chats.v1.ChatService/", upstream: parse("chats", &args.chats_url)? },
            Route { prefix: "/natter.messages.v1.MessageService/", upstream: parse("messages", &args.messages_url)? },
        ];
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).http2_only(true).build(connector);
        Ok(Self { routes: routes.into(), client })
    }

    async fn call(self, request: Request<Body>) -> Result<Response<Body>, Infallible> {
        let path = request.uri().path();
        let Some(route) = self.routes.iter().find(|r| path.starts_with(r.prefix)) else {
            let status = tonic::Status::unimplemented(format!("no service at {path}"));
            return Ok(status.into_http::<Body>());
        };
        let (mut parts, body) = request.into_parts();
        let mut uri = route.upstream.clone().into_parts();
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
        // The client speaks HTTP/2 to the upstream whatever the browser used.
        parts.version = Version::HTTP_2;
        parts.headers.remove(http::header::HOST);
        parts.headers.remove(http::header::CONNECTION);
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => Ok(response.map(Body::new)),
            Err(e) => {
                tracing::warn!(upstream = %route.upstream, error = %e, "upstream call failed");
                Ok(tonic::Status::unavailable("upstream service unavailable").into_http::<Body>())
            }
        }
    }
}

/// Serves the edge on `listener` until `shutdown` is cancelled.
///
/// Errors: a malformed upstream URL, or serving fails.
pub async fn run(args: EdgeArgs, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let forward = Forward::new(&args)?;
    let mut server = Server::new(&args.server);
    server.set_web_dir(&args.web_dir);
    let mut parts = server.into_parts();
    let proxy = tower::service_fn(move |request: Request<Body>| forward.clone().call(request));
    parts.routes = parts.routes.into_axum_router().fallback_service(proxy).into();
    natter_kit::serve::serve_routes(parts, listener, shutdown).await?;
    Ok(())
}
