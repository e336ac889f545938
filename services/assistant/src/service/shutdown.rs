//! A planned shutdown (a deploy's SIGTERM) while a reply is being written,
//! against the fakes of `transient_failures.rs`. Each assistant process is
//! a runtime of its own that ends as soon as [`Assistant::stopped`] returns,
//! as the process exits once `run` returned: whatever is still to be done
//! then never happens. The reply must be finished by then (COMPLETE within
//! the grace, else INTERRUPTED with its text so far), never left
//! GENERATING, and a prompt waiting behind it must be left unread for the
//! next process, which answers it once.

use std::future::Future;

use natter_llm::testing::{Script, ScriptedServer};

use super::transient_failures::{ANSWER, CHAT, Chats, Messages, Users};
use super::*;
use crate::Links;

/// Runs one assistant process: `body` in a runtime of its own, dropped
/// (with every task still in it) once `body` returns.
fn process<T>(body: impl Future<Output = T>) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(body)
}

/// Starts an assistant on `messages` with the model `model`.
async fn start(
    messages: &Arc<Messages>,
    model: &ScriptedServer,
    settings: Settings,
    shutdown: &CancellationToken,
) -> Arc<Assistant> {
    let config = super::transient_failures::scripted_config(model);
    let links = Links { users: Arc::new(Users), messages: messages.clone(), chats: Arc::new(Chats::default()) };
    let llm = natter_llm::Client::new(config).unwrap();
    Assistant::start(llm, links, settings, shutdown.clone()).await.unwrap()
}

/// Waits (10 s at most: the test fails then) until `prompt` waits in its
/// chat's queue.
async fn queued(assistant: &Assistant, prompt: &mpb::Message) {
    let waiting = || {
        let state = assistant.state();
        state.lanes.get(CHAT).is_some_and(|lane| lane.queue.iter().any(|job| job.prompt.id == prompt.id))
    };
    let wait = async {
        while !waiting() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.expect("the prompt is queued");
}

fn status(reply: &mpb::Message) -> mpb::GenerationStatus {
    mpb::GenerationStatus::try_from(reply.generation_status).unwrap()
}

/// Nothing of the chat is left GENERATING.
fn assert_none_generating(messages: &Messages) {
    let store = messages.store();
    let generating: Vec<_> = store.messages.iter().filter(|m| !is_finished(m)).collect();
    assert!(generating.is_empty(), "left GENERATING: {generating:?}");
}

#[test]
fn a_reply_being_written_at_shutdown_finishes_within_the_grace_and_the_prompt_behind_it_waits_for_the_next_process() {
    let messages = Arc::new(Messages::default());
    let (first, second) = process(async {
        let model = ScriptedServer::start(21).await;
        // About 0.6 s of text, most of it after the shutdown.
        model.push(Script::slow(ANSWER, Duration::from_millis(75)));
        let shutdown = CancellationToken::new();
        let settings = Settings { shutdown_grace: Duration::from_secs(30), ..Settings::default() };
        let assistant = start(&messages, &model, settings, &shutdown).await;
        let first = messages.post("how do tides work?");
        messages.first_delta(&first).await;
        let second = messages.post("and why twice a day?");
        queued(&assistant, &second).await;
        shutdown.cancel();
        let within = Duration::from_secs(20);
        tokio::time::timeout(within, assistant.stopped()).await.expect("stopped once the reply was finished");
        assert_eq!(model.requests().len(), 1, "the waiting prompt went nowhere");
        (first, second)
    });
    // The process is gone.
    let replies = messages.replies(&first);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!((status(&replies[0]), replies[0].text.as_str()), (mpb::GenerationStatus::Complete, ANSWER));
    assert!(messages.replies(&second).is_empty(), "nothing new is taken once shutting down");
    assert_eq!(messages.store().read_seq, first.seq, "read past the answered prompt only");
    assert_none_generating(&messages);

    // The next process (a restart, or another replica) answers the waiting
    // prompt, once, and not the finished one again.
    process(async {
        let model = ScriptedServer::start(22).await;
        model.set_fallback(Script::reply("Two bulges, one on each side."));
        let shutdown = CancellationToken::new();
        let assistant = start(&messages, &model, Settings::default(), &shutdown).await;
        let reply = messages.finished_reply(&second).await;
        assert_eq!(
            (status(&reply), reply.text.as_str()),
            (mpb::GenerationStatus::Complete, "Two bulges, one on each side.")
        );
        assert_eq!(model.requests().len(), 1, "the model asked for the waiting prompt only");
        shutdown.cancel();
        assistant.stopped().await;
    });
    assert_eq!((messages.replies(&first).len(), messages.replies(&second).len()), (1, 1), "each answered once");
    assert_eq!(messages.store().read_seq, second.seq);
    assert_none_generating(&messages);
}

#[test]
fn a_reply_still_going_when_the_grace_runs_out_ends_interrupted_with_its_text_so_far() {
    let messages = Arc::new(Messages::default());
    let grace = Duration::from_millis(300);
    let ended = process(async {
        let model = ScriptedServer::start(23).await;
        model.push(Script::hang_after("The moon pulls"));
        let shutdown = CancellationToken::new();
        let settings = Settings { shutdown_grace: grace, ..Settings::default() };
        let assistant = start(&messages, &model, settings, &shutdown).await;
        let prompt = messages.post("how do tides work?");
        messages.first_delta(&prompt).await;
        shutdown.cancel();
        let at = tokio::time::Instant::now();
        tokio::time::timeout(grace + FINISH_WAIT, assistant.stopped()).await.expect("stopped within the grace");
        (prompt, at.elapsed())
    });
    // The process is gone.
    let (prompt, took) = ended;
    let replies = messages.replies(&prompt);
    assert_eq!(replies.len(), 1, "{replies:?}");
    let reply = &replies[0];
    assert_eq!((status(reply), reply.text.as_str()), (mpb::GenerationStatus::Interrupted, "The moon pulls"));
    let error = &reply.generation.as_ref().unwrap().error;
    assert!(error.contains("shut down"), "{error}");
    assert_none_generating(&messages);
    assert!(took >= grace, "the reply had its grace: stopped after {took:?}");
}
