//! The assistant across a crash: `natter serve` killed with SIGKILL while a
//! reply streams, then started again on the same data directory. The reply
//! must end INTERRUPTED with its last checkpoint (never an empty "thinking"
//! bubble forever), and the prompt must not be answered a second time.

use std::time::{Duration, Instant};

use natter_llm::testing::{Script, ScriptedServer};
use natter_proto::assistant::v1::{self as apb, assistant_service_client::AssistantServiceClient};
use natter_proto::messages::v1::{self as mpb, message_service_client::MessageServiceClient};

use super::{Event, Node, authed, free_port, user};

/// What the scripted model says, slowly (100 ms per 3 characters: about 4 s).
const TEXT: &str = "Once upon a time a chat server crashed in the middle of a sentence, and";

/// A new user, alice: her token and her assistant chat.
async fn alice_and_her_assistant_chat(channel: &tonic::transport::Channel) -> (String, String) {
    let (_, token) = user(channel, "alice").await;
    let chat = AssistantServiceClient::new(channel.clone())
        .get_or_create_assistant_chat(authed(&token, apb::GetOrCreateAssistantChatRequest {}))
        .await
        .unwrap()
        .into_inner()
        .chat_id;
    (token, chat)
}

/// A story being written: `natter serve` on `dir` with its assistant on
/// `server`, which tells [`TEXT`] slowly, and `more` flags; alice asks for a
/// story. Returns once the reply is written to: the node, alice's token,
/// her chat, the reply's id and the last change number her stream saw.
async fn a_story_being_written(
    server: &ScriptedServer,
    dir: &std::path::Path,
    more: &[&str],
) -> (Node, String, String, String, i64) {
    server.push(Script::slow(TEXT, Duration::from_millis(100)));
    let mut args =
        vec!["--data-dir".to_owned(), dir.display().to_string(), "--assistant-base-url".into(), server.url().into()];
    args.extend(more.iter().map(|a| (*a).to_owned()));
    let natter = Node::start("serve", free_port(), args);
    let channel = natter.channel().await;
    let (token, chat) = alice_and_her_assistant_chat(&channel).await;
    let mut messages = MessageServiceClient::new(channel);
    let send = mpb::SendMessageRequest { chat_id: chat.clone(), text: "tell me a story".into(), ..Default::default() };
    messages.send_message(authed(&token, send)).await.unwrap();
    let follow = mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut stream = messages.stream_events(authed(&token, follow)).await.unwrap().into_inner();
    let mut last_change = 0;
    let reply = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        last_change = last_change.max(event.change_seq);
        if let Some(Event::MessageDelta(d)) = event.event {
            break d.message_id;
        }
    };
    (natter, token, chat, reply, last_change)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_by_a_crash_ends_interrupted_with_its_checkpoint_and_is_not_retried() {
    let server = ScriptedServer::start(9).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut natter, token, chat, reply, last_change) =
        a_story_being_written(&server, dir.path(), &["--assistant-lease", "2s"]).await;
    let mut messages = MessageServiceClient::new(natter.channel().await);
    // Wait for a checkpoint (about every second): the stored text grows.
    let get = mpb::GetMessageRequest { message_id: reply.clone() };
    let deadline = Instant::now() + Duration::from_secs(10);
    let checkpoint = loop {
        let m = messages.get_message(authed(&token, get.clone())).await.unwrap().into_inner().message.unwrap();
        if !m.text.is_empty() {
            assert_eq!(m.generation_status, mpb::GenerationStatus::Generating as i32);
            break m.text;
        }
        assert!(Instant::now() < deadline, "no checkpoint within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    natter.kill();
    assert!(server.disconnected(0, Duration::from_secs(5)).await.is_some(), "the crash cut the model's stream");

    // Started again: the sweeper ends the reply once its lease (2 s) ran out.
    natter.spawn();
    let channel = natter.channel().await;
    let mut messages = MessageServiceClient::new(channel);
    let resume = mpb::StreamEventsRequest {
        chat_ids: vec![chat.clone()],
        resume_changes: [(chat.clone(), last_change)].into_iter().collect(),
        ..Default::default()
    };
    let mut stream = messages.stream_events(authed(&token, resume)).await.unwrap().into_inner();
    let ended = loop {
        let event = tokio::time::timeout(Duration::from_secs(15), stream.message()).await.unwrap().unwrap().unwrap();
        if let Some(Event::MessageEdited(m)) = event.event
            && m.id == reply
            && m.generation_status != mpb::GenerationStatus::Generating as i32
        {
            break m;
        }
    };
    assert_eq!(ended.generation_status, mpb::GenerationStatus::Interrupted as i32, "{ended:?}");
    assert!(ended.text.starts_with(&checkpoint) && TEXT.starts_with(&ended.text), "{:?}", ended.text);
    assert!(!ended.generation.unwrap().error.is_empty());
    // Not retried by itself: the model was asked once.
    assert_eq!(server.requests().len(), 1);
}

/// A planned stop is no crash: `natter serve` stopped with SIGTERM while a
/// reply streams lets it finish within its shutdown grace (about 4 s of a
/// 10 s grace), stores it COMPLETE, and only then exits; started again, the
/// reply is there whole, not GENERATING nor cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_being_written_when_natter_serve_stops_finishes_within_the_grace() {
    let server = ScriptedServer::start(10).await;
    let dir = tempfile::tempdir().unwrap();
    // A long lease: no sweeper ends the reply for the test.
    let more = ["--shutdown-grace", "10s", "--assistant-lease", "60s"];
    let (mut natter, token, _, reply, _) = a_story_being_written(&server, dir.path(), &more).await;
    natter.terminate();

    natter.spawn();
    let mut messages = MessageServiceClient::new(natter.channel().await);
    let get = mpb::GetMessageRequest { message_id: reply };
    let stored = messages.get_message(authed(&token, get)).await.unwrap().into_inner().message.unwrap();
    assert_eq!(
        (stored.generation_status, stored.text.as_str()),
        (mpb::GenerationStatus::Complete as i32, TEXT),
        "finished before the process exited"
    );
    assert_eq!(server.requests().len(), 1, "answered once");
}

/// A prompt refused because the chat's queue was full must not take the
/// prompts queued before it down with it: the assistant's read position
/// stays before them, so after a crash they are replayed and answered.
/// With `--assistant-queue 1`: prompt 1 is being answered (slowly), prompt
/// 2 waits, prompt 3 is refused (a FAILED reply at once); SIGKILL; started
/// again, prompt 1's reply ends INTERRUPTED, prompt 2 is answered, prompt 3
/// keeps its one FAILED reply, and the model is asked once per answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_queued_before_a_refused_one_is_answered_after_a_crash() {
    let server = ScriptedServer::start(11).await;
    server.push(Script::slow(TEXT, Duration::from_millis(100)));
    server.set_fallback(Script::reply("ok"));
    let dir = tempfile::tempdir().unwrap();
    let args = ["--data-dir", &dir.path().display().to_string(), "--assistant-base-url", server.url()]
        .into_iter()
        .chain(["--assistant-queue", "1", "--assistant-lease", "2s"])
        .map(str::to_owned)
        .collect();
    let mut natter = Node::start("serve", free_port(), args);
    let channel = natter.channel().await;
    let (token, chat) = alice_and_her_assistant_chat(&channel).await;
    let mut messages = MessageServiceClient::new(channel);
    let follow = mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut stream = messages.stream_events(authed(&token, follow)).await.unwrap().into_inner();
    let mut send = async |text: &str| {
        let request = mpb::SendMessageRequest { chat_id: chat.clone(), text: text.into(), ..Default::default() };
        messages.send_message(authed(&token, request)).await.unwrap().into_inner().message.unwrap().seq
    };
    let first = send("tell me a long story").await;
    // Prompt 1's reply is being written...
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        if let Some(Event::MessageDelta(_)) = event.event {
            break;
        }
    }
    // ...prompt 2 waits behind it, prompt 3 finds the queue full.
    let queued = send("and then?").await;
    let refused = send("and then, and then?").await;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        if let Some(Event::MessageCreated(m)) = event.event
            && m.reply_to_seq == refused
        {
            assert_eq!(m.generation_status, mpb::GenerationStatus::Failed as i32, "{m:?}");
            break;
        }
    }
    drop(stream);
    natter.kill();

    natter.spawn();
    let mut messages = MessageServiceClient::new(natter.channel().await);
    let list = mpb::ListMessagesRequest {
        chat_id: chat.clone(),
        order: mpb::SortOrder::Asc as i32,
        page_size: 50,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let replies = loop {
        let all = messages.list_messages(authed(&token, list.clone())).await.unwrap().into_inner().messages;
        let replies: Vec<(i64, i32)> = all
            .iter()
            .filter(|m| m.role == mpb::MessageRole::Assistant as i32)
            .map(|m| (m.reply_to_seq, m.generation_status))
            .collect();
        if replies.iter().all(|(_, status)| *status != mpb::GenerationStatus::Generating as i32) && replies.len() == 3 {
            break replies;
        }
        assert!(Instant::now() < deadline, "not every prompt answered within 15 s of the restart: {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut by_prompt = replies.clone();
    by_prompt.sort_unstable();
    assert_eq!(
        by_prompt,
        [
            (first, mpb::GenerationStatus::Interrupted as i32),
            (queued, mpb::GenerationStatus::Complete as i32),
            (refused, mpb::GenerationStatus::Failed as i32),
        ],
        "one reply per prompt"
    );
    assert_eq!(server.requests().len(), 2, "the model was asked for prompts 1 and 2 only, once each");
}
