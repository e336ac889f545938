//! The runtime every natter server shares: base configuration, logging, the
//! mapping of errors onto gRPC status codes, page tokens, id and time
//! conversions, rate limits and input caps, and [`serve`], which wraps a set
//! of tonic services with health, reflection, gRPC-web, CORS and per-RPC
//! tracing.
//!
//! Services keep their domain logic elsewhere; this crate holds only what
//! would otherwise be written once per binary.
//!
//! # Layers
//!
//! The modules form layers, lowest first; a module uses only modules of the
//! layers below its own (the test `modules_use_only_lower_layers` checks the
//! `crate::` paths in the code, not in comments), so there is no import
//! circle and each module can be read knowing only what is under it:
//!
//! 1. `coalesce`, `config`, `cut_body`, `error`, `limits`, `time`,
//!    `web_page`: streams' writes, flags, the answer to a request body the
//!    client cut short, status mapping, caps, clocks, the browser page's
//!    files.
//! 2. `id`, `paging`: checked ids and page tokens (they fail with `error`'s
//!    statuses, paging within `limits`).
//! 3. `metrics`: Prometheus handles and the `/metrics` endpoint.
//! 4. `accept`, `budget`, `cache`, `telemetry`, `unread`: the connections a
//!    listener accepts (its cap, the handshake, idle and write deadlines;
//!    counted in `metrics`); the budget of request bytes a server holds
//!    (refusals counted in `metrics`); replicas' caches of other services'
//!    answers (invalidated over the bus); logs, span export, trace context
//!    in and out, starting the metrics endpoint; the slow-consumer rule,
//!    which resets HTTP/2 streams whose answers go unread (counted in
//!    `metrics`).
//! 5. `observe`, `tokenless`: the per-RPC server span and metrics layer, and
//!    the client spans of calls to other services (the traced channel,
//!    in-process calls); the cap on streaming calls with no token, per
//!    connection (told apart by `accept`) and per server.
//! 6. `internal`: service credential and links between split services (a
//!    traced channel carrying the credential).
//! 7. `serve`: the server and its tower stack (observe, the internal gate)
//!    on the connections of `accept`.
//!
//! A helper needed by two layers lives in the lower one (the RPC path split
//! is in `metrics`, the per-RPC span in `observe`); an upper layer hands a
//! lower one plain values (the credential reaches telemetry's channel as a
//! header), never its own types.

mod accept;
pub mod budget;
pub mod cache;
pub mod coalesce;
pub mod config;
mod cut_body;
pub mod error;
pub mod id;
pub mod internal;
pub mod limits;
pub mod metrics;
mod observe;
pub mod paging;
pub mod serve;
pub mod telemetry;
pub mod time;
pub mod tokenless;
pub mod unread;
pub mod web_page;

pub use config::{ServerArgs, TransportArgs};
pub use error::{FieldViolations, internal, internal_at, store_failure_at};
pub use internal::{InternalArgs, Link, ServiceCredential};
pub use limits::{TrustedProxies, client_ip};
pub use observe::{
    Propagate, PropagateLayer, RpcBody, RpcFuture, TracedChannel, client_future, client_span, in_process, traced,
};
pub use serve::{Server, shutdown_signal};

#[cfg(test)]
mod layering {
    /// The layers of the module docs, lowest first, with each module's source.
    const LAYERS: &[&[(&str, &str)]] = &[
        &[
            ("coalesce", include_str!("coalesce.rs")),
            ("cut_body", include_str!("cut_body.rs")),
            ("error", include_str!("error.rs")),
            ("limits", include_str!("limits.rs")),
            ("time", include_str!("time.rs")),
            ("web_page", include_str!("web_page.rs")),
        ],
        &[("config", include_str!("config.rs")), ("id", include_str!("id.rs")), ("paging", include_str!("paging.rs"))],
        &[("metrics", include_str!("metrics.rs"))],
        &[
            ("accept", include_str!("accept.rs")),
            ("budget", include_str!("budget.rs")),
            ("cache", include_str!("cache.rs")),
            ("telemetry", include_str!("telemetry.rs")),
            ("unread", include_str!("unread.rs")),
        ],
        &[("observe", include_str!("observe.rs")), ("tokenless", include_str!("tokenless.rs"))],
        &[("internal", include_str!("internal.rs"))],
        &[("serve", include_str!("serve.rs"))],
    ];

    /// The modules a source uses through `crate::` paths (`crate::a::b`,
    /// `crate::{a, b::c}`), comment lines skipped.
    fn used_modules(source: &str) -> Vec<String> {
        let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
        let mut used = Vec::new();
        for line in source.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                match rest.strip_prefix('{') {
                    Some(group) => {
                        let group = group.split('}').next().unwrap_or_default();
                        used.extend(group.split(',').map(|item| ident(item.trim())));
                    }
                    None => used.push(ident(rest)),
                }
            }
        }
        used.retain(|m| !m.is_empty());
        used
    }

    #[test]
    fn modules_use_only_lower_layers() {
        let layer_of = |name: &str| LAYERS.iter().position(|layer| layer.iter().any(|(m, _)| *m == name));
        for (level, layer) in LAYERS.iter().enumerate() {
            for (module, source) in *layer {
                for used in used_modules(source) {
                    // Items of lib.rs itself (re-exports) are not a layer.
                    let Some(used_level) = layer_of(&used) else { continue };
                    assert!(
                        used_level < level,
                        "{module} (layer {}) uses crate::{used} (layer {}): move the item down or the use up",
                        level + 1,
                        used_level + 1
                    );
                }
            }
        }
    }

    #[test]
    fn uses_are_found_in_paths_and_groups_but_not_comments() {
        let source = "use crate::{a, b::c};\n    // crate::x\nlet y = crate::serve::f(crate::id::parse);";
        assert_eq!(used_modules(source), ["a", "b", "serve", "id"]);
    }

    #[test]
    fn every_module_has_a_layer() {
        let listed: Vec<&str> = LAYERS.iter().flat_map(|layer| layer.iter().map(|(m, _)| *m)).collect();
        let declared: Vec<&str> = include_str!("lib.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod ")))
            .filter_map(|l| l.strip_suffix(';'))
            .collect();
        for module in &declared {
            assert!(listed.contains(module), "module {module} is in no layer (see the crate docs)");
        }
        assert_eq!(listed.len(), declared.len(), "LAYERS names a module lib.rs does not declare");
    }
}
