//! A stand-in OpenAI-compatible server for trying natter's assistant without
//! a model: every `POST /v1/chat/completions` streams the same reply, a few
//! characters every 40 ms (about 1.5 s in all), the way llama.cpp's server
//! does. Prints its base URL, then serves until killed. CI runs the README's
//! assistant walk-through against it.
//!
//! ```sh
//! cargo run -p natter-llm --features testing --example scripted_llm
//! ```

use std::time::Duration;

use natter_llm::testing::{Script, ScriptedServer};

/// What every reply says.
const REPLY: &str = "natter is a chat backend: gRPC services for sessions, chats, messages and this assistant.";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let server = ScriptedServer::start(0).await;
    server.set_fallback(Script::slow(REPLY, Duration::from_millis(40)));
    println!("{}", server.url());
    std::future::pending::<()>().await;
}
