//! The runtime every natter server shares: base configuration, logging, the
//! mapping of errors onto gRPC status codes, page tokens, id and time
//! conversions, rate limits and input caps, and [`serve`], which wraps a set
//! of tonic services with health, reflection, gRPC-web, CORS and per-RPC
//! tracing.
//!
//! Services keep their domain logic elsewhere; this crate holds only what
//! would otherwise be written once per binary.

pub mod config;
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

pub use config::{ServerArgs, TransportArgs};
pub use error::{FieldViolations, internal, internal_at};
pub use internal::{InternalArgs, Link, ServiceCredential};
pub use limits::client_ip;
pub use serve::{Server, shutdown_signal};
