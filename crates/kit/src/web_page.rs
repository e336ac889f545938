//! The browser page at `/`: built into the binary, or read from a directory.
//!
//! The bundle `web/dist/app.js` (made by `npm --prefix web run build`) is
//! committed and compiled in with `include_bytes!`, beside `web/src`'s
//! `index.html` and `style.css`, so `natter serve` on a
//! fresh clone serves the page with no npm step; CI rebuilds it and fails if
//! the committed bundle is stale. A directory given instead (`--web-dir`)
//! replaces it, for working on the page without rebuilding the binary.

use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::path::PathBuf;
use std::sync::LazyLock;

use http::header::{
    CACHE_CONTROL, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

/// The page's Content-Security-Policy (W3C CSP Level 3): scripts, styles,
/// and every connection from its own origin only. A link that points the
/// page at another server (`?server=https://elsewhere`) cannot make it send
/// a typed password or a token there: the browser refuses the connection.
/// A page that must talk to another server is served from elsewhere (any
/// static server; see web/README.md). The favicon is an empty `data:` URL.
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// Adds the page's security headers to a response of its files: the
/// Content-Security-Policy ([`CONTENT_SECURITY_POLICY_VALUE`]), `nosniff`,
/// and no Referer to other sites.
pub(crate) fn secure(headers: &mut HeaderMap) {
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

/// Where the page at `/` comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PageSource {
    /// No page: GET requests reach the API (internal listeners, services).
    #[default]
    Off,
    /// The bundle compiled into the binary (`web/dist` at build time).
    Embedded,
    /// The files of a directory, served as they are on disk.
    Dir(PathBuf),
}

impl PageSource {
    /// The source `--web-dir` and `--no-web-page` ask for: off wins, then a
    /// directory, else the built-in page.
    ///
    /// # Errors
    /// A `dir` that is not a directory (a typo must not quietly serve
    /// nothing), or one without an `index.html` (`/` would be 404: a fresh
    /// clone's `web/dist` holds only the committed `app.js` until `npm
    /// --prefix web run build` copies the page's other files there), naming
    /// the flag.
    pub fn from_flags(dir: Option<&std::path::Path>, off: bool) -> anyhow::Result<Self> {
        match (off, dir) {
            (true, _) => Ok(Self::Off),
            (false, None) => Ok(Self::Embedded),
            (false, Some(dir)) if !dir.is_dir() => anyhow::bail!("--web-dir {}: not a directory", dir.display()),
            (false, Some(dir)) if !dir.join("index.html").is_file() => anyhow::bail!(
                "--web-dir {}: no index.html in it, so / would be 404 (to serve web/dist, build the page first: \
                 npm --prefix web ci && npm --prefix web run build)",
                dir.display()
            ),
            (false, Some(dir)) => Ok(Self::Dir(dir.to_owned())),
        }
    }
}

/// One file of the built-in page.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

/// The built-in page: what `web/build.mjs` writes to `web/dist` (the bundle,
/// committed) and the two files it copies there unchanged from `web/src`.
const ASSETS: [Asset; 3] = [
    Asset {
        path: "/index.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../../../web/src/index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../../web/dist/app.js"),
    },
    Asset {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../../web/src/style.css"),
    },
];

/// One strong ETag for the whole built-in page (RFC 9110 section 8.8.3): the
/// files change only with the binary, so a hash of all of them will do.
static EMBEDDED_ETAG: LazyLock<HeaderValue> = LazyLock::new(|| {
    let mut hasher = DefaultHasher::new();
    for asset in &ASSETS {
        asset.path.hash(&mut hasher);
        asset.bytes.hash(&mut hasher);
    }
    HeaderValue::from_str(&format!("\"{:016x}\"", hasher.finish())).expect("hex is a valid header value")
});

/// Answers a GET or HEAD for the built-in page: 200 with the file (`/` is
/// `/index.html`), 304 when `If-None-Match` names the current ETag, 404 for
/// any other path. Browsers revalidate every time (`no-cache`), so a new
/// binary's page is never hidden behind a stale cache.
pub(crate) fn embedded<B>(request: &http::Request<B>) -> http::Response<tonic::body::Body> {
    let path = match request.uri().path() {
        "/" => "/index.html",
        path => path,
    };
    let Some(asset) = ASSETS.iter().find(|asset| asset.path == path) else {
        let mut response = http::Response::new(tonic::body::Body::new(String::from("not found")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    };
    let etag = EMBEDDED_ETAG.clone();
    let fresh = request.headers().get_all(IF_NONE_MATCH).iter().any(|tag| tag == etag || tag == "*");
    let (status, body) = match (fresh, request.method()) {
        (true, _) => (StatusCode::NOT_MODIFIED, tonic::body::Body::empty()),
        (false, &Method::HEAD) => (StatusCode::OK, tonic::body::Body::empty()),
        (false, _) => {
            (StatusCode::OK, tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from_static(asset.bytes))))
        }
    };
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    secure(headers);
    headers.insert(ETAG, etag);
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if status == StatusCode::OK {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(asset.bytes.len()));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, if_none_match: Option<&HeaderValue>) -> http::Response<tonic::body::Body> {
        let mut request = http::Request::get(path);
        if let Some(tag) = if_none_match {
            request = request.header(IF_NONE_MATCH, tag);
        }
        embedded(&request.body(()).unwrap())
    }

    #[test]
    fn root_is_the_index_and_unknown_paths_are_not_found() {
        let root = get("/", None);
        assert_eq!(root.status(), StatusCode::OK);
        assert_eq!(root.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(root.headers()[CONTENT_LENGTH], ASSETS[0].bytes.len().to_string().as_str());
        assert_eq!(get("/app.js", None).headers()[CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(get("/app.js.map", None).status(), StatusCode::NOT_FOUND);
        assert_eq!(get("/../Cargo.toml", None).status(), StatusCode::NOT_FOUND);
    }

    /// The page talks to its own origin only: a `?server=` of another
    /// origin is refused by the browser (what the page would send there: a
    /// typed password).
    #[test]
    fn the_page_may_connect_to_its_own_origin_only() {
        for path in ["/", "/app.js", "/style.css"] {
            let response = get(path, None);
            let csp = response.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.split(';').any(|d| d.trim() == "connect-src 'self'"), "{path}: {csp}");
            assert!(csp.split(';').any(|d| d.trim() == "script-src 'self'"), "{path}: {csp}");
            assert_eq!(response.headers()[X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
    }

    #[test]
    fn a_current_etag_gets_not_modified() {
        let etag = get("/style.css", None).headers()[ETAG].clone();
        assert_eq!(get("/style.css", Some(&etag)).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(get("/style.css", Some(&HeaderValue::from_static("\"stale\""))).status(), StatusCode::OK);
    }

    #[test]
    fn flags_choose_the_source() {
        assert_eq!(PageSource::from_flags(None, false).unwrap(), PageSource::Embedded);
        assert_eq!(PageSource::from_flags(None, true).unwrap(), PageSource::Off);
        let err = PageSource::from_flags(Some(std::path::Path::new("/no/such/dir")), false).unwrap_err();
        assert!(err.to_string().contains("--web-dir /no/such/dir"), "{err}");
    }

    /// A directory without the page's `index.html` (a fresh clone's
    /// `web/dist`, before `npm run build`) is refused, saying how to build
    /// it, rather than served with `/` answering 404; with one it is served.
    #[test]
    fn a_web_dir_without_index_html_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.js"), "").unwrap();
        let err = PageSource::from_flags(Some(dir.path()), false).unwrap_err().to_string();
        assert!(err.contains(&format!("--web-dir {}: no index.html", dir.path().display())), "{err}");
        assert!(err.contains("npm --prefix web run build"), "{err}");
        std::fs::write(dir.path().join("index.html"), "<!doctype html>").unwrap();
        assert_eq!(PageSource::from_flags(Some(dir.path()), false).unwrap(), PageSource::Dir(dir.path().to_owned()));
    }
}
