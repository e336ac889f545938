//! Two assistant replicas, as an operator scales the assistant out in split
//! mode: two `natter assistant` processes (each on its own `natter
//! messages` replica) beside one sessions and one chats service, on one
//! PostgreSQL and one NATS, both following the bot's chats. What users
//! would notice: each prompt is answered once (the model is asked once per
//! prompt), a Stop sent through the replica that is not generating stops
//! the reply and the model's stream, and a SIGKILL of the generating
//! replica leaves the reply INTERRUPTED with its checkpoint (the other
//! replica's sweeper ends it) and the prompt queued behind it answered by
//! the survivor. Runs when NATTER_TEST_DATABASE_URL and NATTER_TEST_NATS_URL
//! are set.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use natter_llm::testing::{Script, ScriptedServer};
use natter_proto::assistant::v1::{self as apb, assistant_service_client::AssistantServiceClient};
use natter_proto::messages::v1::{self as mpb, message_service_client::MessageServiceClient};
use tonic::transport::Channel;

use super::{
    Event, Node, authed, credential_file, drop_schemas, env, free_port, next, send_until_acked, shared_store, user,
};

/// What the scripted model says when a test needs a reply to last: 100 ms
/// per 3 characters, about 5 s.
const TEXT: &str =
    "Two replicas follow the same chats, and only one of them may answer each prompt, however they race.";

/// The system prompt of replica `i` (0 or 1): the model's requests say
/// which replica sent them.
fn system_prompt(i: usize) -> String {
    format!("You are replica {i} of the assistant.")
}

/// The replica (0 or 1) that sent the model request `r`.
fn sender(r: &natter_llm::testing::Recorded) -> usize {
    let system = r.body["messages"][0]["content"].as_str().unwrap_or_default();
    (0..2)
        .find(|i| system.starts_with(&system_prompt(*i)))
        .unwrap_or_else(|| panic!("unknown system prompt {system:?}"))
}

/// The prompt a model request answers: its last user message.
fn prompt_of(r: &natter_llm::testing::Recorded) -> String {
    let messages = r.body["messages"].as_array().expect("messages");
    let last = messages.iter().rev().find(|m| m["role"] == "user").expect("a user message");
    last["content"].as_str().unwrap_or_default().to_owned()
}

/// The messages of `chat`, oldest first.
async fn listed(channel: &Channel, token: &str, chat: &str) -> Vec<mpb::Message> {
    let request = mpb::ListMessagesRequest {
        chat_id: chat.to_owned(),
        page_size: 200,
        order: mpb::SortOrder::Asc as i32,
        ..Default::default()
    };
    let answer = MessageServiceClient::new(channel.clone()).list_messages(authed(token, request)).await.unwrap();
    answer.into_inner().messages
}

/// Waits (10 s at most) until every prompt of `chat` (`prompts`, by text)
/// has a finished reply, and returns the chat's messages then.
async fn answered(channel: &Channel, token: &str, chat: &str, prompts: usize) -> Vec<mpb::Message> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = listed(channel, token, chat).await;
        let finished = all
            .iter()
            .filter(|m| {
                m.role == mpb::MessageRole::Assistant as i32
                    && m.generation_status != mpb::GenerationStatus::Generating as i32
            })
            .count();
        if finished >= prompts {
            return all;
        }
        assert!(Instant::now() < deadline, "{finished} of {prompts} prompts answered within 10 s: {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first message_delta of the stream, skipping other events: its
/// reply's id.
async fn first_delta(stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>) -> String {
    loop {
        if let Some(Event::MessageDelta(d)) = next(stream).await.expect("the stream stays open").event {
            return d.message_id;
        }
    }
}

/// The stream's next change of `reply` that finishes it.
async fn ended(stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>, reply: &str) -> mpb::Message {
    loop {
        if let Some(Event::MessageEdited(m)) = next(stream).await.expect("the stream stays open").event
            && m.id == reply
            && m.generation_status != mpb::GenerationStatus::Generating as i32
        {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_assistant_replicas_answer_once_stop_from_either_and_sweep_each_other_s_crash() {
    let (Some(db), Some(nats)) = (env("NATTER_TEST_DATABASE_URL"), env("NATTER_TEST_NATS_URL")) else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL and NATTER_TEST_NATS_URL are not set");
        return;
    };
    let llm = ScriptedServer::start(21).await;
    let prefix = format!("a{}_", uuid::Uuid::new_v4().simple());
    let secrets = tempfile::tempdir().unwrap();
    let credential = credential_file(secrets.path());
    // Each process's internal listener: what the others call.
    let internal: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let internal_url = |i: usize| format!("http://127.0.0.1:{}", internal[i]);
    let (s, c, m1, m2, a1, a2) = (0, 1, 2, 3, 4, 5);
    let common = |i: usize, store: bool, more: Vec<String>| -> Vec<String> {
        let mut v = vec![
            "--internal-listen".into(),
            format!("127.0.0.1:{}", internal[i]),
            "--service-credential-file".into(),
            credential.clone(),
        ];
        if store {
            v.extend(shared_store(&db, &prefix, &nats));
        }
        v.extend(more);
        v
    };
    let sessions = Node::start("sessions", free_port(), common(s, true, vec![]));
    let chats = Node::start(
        "chats",
        free_port(),
        common(c, true, vec!["--sessions-url".into(), internal_url(s), "--messages-url".into(), internal_url(m1)]),
    );
    let messages_args = |m: usize| {
        common(m, true, vec!["--sessions-url".into(), internal_url(s), "--chats-url".into(), internal_url(c)])
    };
    let messages = [
        Node::start("messages", free_port(), messages_args(m1)),
        Node::start("messages", free_port(), messages_args(m2)),
    ];
    // Replica i on messages replica i; a 2 s lease (swept every 2/3 s) keeps
    // the crash short.
    let assistant_args = |i: usize, a: usize, m: usize| {
        let more = [
            "--sessions-url",
            &internal_url(s),
            "--chats-url",
            &internal_url(c),
            "--messages-url",
            &internal_url(m),
            "--assistant-base-url",
            llm.url(),
            "--assistant-system-prompt",
            &system_prompt(i),
            "--assistant-lease",
            "2s",
        ];
        common(a, false, more.map(str::to_owned).into())
    };
    let mut assistants = [
        Node::start("assistant", free_port(), assistant_args(0, a1, m1)),
        Node::start("assistant", free_port(), assistant_args(1, a2, m2)),
    ];
    let sessions_ch = sessions.channel().await;
    chats.channel().await;
    let on_messages = [messages[0].channel().await, messages[1].channel().await];
    let on_assistant = [assistants[0].channel().await, assistants[1].channel().await];

    // Three people, each with an assistant chat (made through either
    // replica), three prompts each, sent alternately through both
    // messages replicas; one send retried with its id on the other.
    let mut people = Vec::new();
    for (i, name) in ["ann", "ben", "cat"].into_iter().enumerate() {
        let (_, token) = user(&sessions_ch, name).await;
        let chat = AssistantServiceClient::new(on_assistant[i % 2].clone())
            .get_or_create_assistant_chat(authed(&token, apb::GetOrCreateAssistantChatRequest {}))
            .await
            .unwrap()
            .into_inner()
            .chat_id;
        people.push((name, token, chat));
    }
    let mut prompts: Vec<String> = Vec::new();
    let mut seqs: Vec<Vec<i64>> = vec![Vec::new(); people.len()];
    for round in 0..3 {
        for (i, (name, token, chat)) in people.iter().enumerate() {
            let text = format!("{name}'s question {round}");
            let sent = send_until_acked(&on_messages[(i + round) % 2], token, chat, text.clone()).await;
            if round == 1 {
                let retry =
                    mpb::SendMessageRequest { chat_id: chat.clone(), message_id: sent.id, text, ..Default::default() };
                let mut other = MessageServiceClient::new(on_messages[(i + round + 1) % 2].clone());
                let again = other.send_message(authed(token, retry)).await.unwrap().into_inner().message.unwrap();
                assert_eq!(again.seq, sent.seq, "a retried send is the same message");
            }
            seqs[i].push(sent.seq);
            prompts.push(sent.text);
        }
    }
    for ((_, token, chat), seqs) in people.iter().zip(&seqs) {
        let all = answered(&on_messages[0], token, chat, 3).await;
        // Each prompt has one reply, complete.
        let replies: Vec<(i64, i32)> = all
            .iter()
            .filter(|m| m.role == mpb::MessageRole::Assistant as i32)
            .map(|m| (m.reply_to_seq, m.generation_status))
            .collect();
        let complete = mpb::GenerationStatus::Complete as i32;
        let want: Vec<(i64, i32)> = seqs.iter().map(|s| (*s, complete)).collect();
        assert_eq!(replies, want, "{all:?}");
        assert_eq!(all.len(), 6, "three prompts, three replies: {all:?}");
    }
    // The model was asked once per prompt, whichever replica asked.
    let mut asked: Vec<String> = llm.requests().iter().map(prompt_of).collect();
    asked.sort();
    prompts.sort();
    assert_eq!(asked, prompts, "one generation per prompt");

    // Stop through the replica that is not generating: the durable flag
    // reaches the generator at its next checkpoint, which drops the
    // model's stream; the reply ends STOPPED with its text so far.
    let (_, ann, chat) = people[0].clone();
    let follow = || mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut stream = MessageServiceClient::new(on_messages[1].clone())
        .stream_events(authed(&ann, follow()))
        .await
        .unwrap()
        .into_inner();
    llm.push(Script::slow(TEXT, Duration::from_millis(100)));
    let slow = llm.requests().len();
    send_until_acked(&on_messages[0], &ann, &chat, "tell me something long".into()).await;
    let reply = first_delta(&mut stream).await;
    let generating = sender(&llm.requests()[slow]);
    let stop = apb::StopGenerationRequest { message_id: reply.clone() };
    AssistantServiceClient::new(on_assistant[1 - generating].clone())
        .stop_generation(authed(&ann, stop))
        .await
        .unwrap();
    assert!(llm.disconnected(slow, Duration::from_secs(5)).await.is_some(), "the stop closed the model's stream");
    let stopped = ended(&mut stream, &reply).await;
    assert_eq!(stopped.generation_status, mpb::GenerationStatus::Stopped as i32, "{stopped:?}");
    assert!(
        !stopped.text.is_empty() && stopped.text.len() < TEXT.len() && TEXT.starts_with(&stopped.text),
        "{:?}",
        stopped.text
    );

    // SIGKILL of the replica generating, with a prompt queued behind its
    // reply: the survivor's sweeper ends the reply INTERRUPTED with its
    // last checkpoint once the lease (2 s) ran out, then answers the queued
    // prompt.
    llm.push(Script::slow(TEXT, Duration::from_millis(100)));
    let slow = llm.requests().len();
    let cut = send_until_acked(&on_messages[1], &ann, &chat, "and another long one".into()).await;
    let reply = first_delta(&mut stream).await;
    let generating = sender(&llm.requests()[slow]);
    let queued = send_until_acked(&on_messages[0], &ann, &chat, "then a short one".into()).await;
    let get = mpb::GetMessageRequest { message_id: reply.clone() };
    let deadline = Instant::now() + Duration::from_secs(10);
    let checkpoint = loop {
        let m = MessageServiceClient::new(on_messages[0].clone())
            .get_message(authed(&ann, get.clone()))
            .await
            .unwrap()
            .into_inner()
            .message
            .unwrap();
        if !m.text.is_empty() {
            break m.text;
        }
        assert!(Instant::now() < deadline, "no checkpoint within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assistants[generating].kill();
    assert!(llm.disconnected(slow, Duration::from_secs(5)).await.is_some(), "the crash cut the model's stream");
    let interrupted = ended(&mut stream, &reply).await;
    assert_eq!(interrupted.generation_status, mpb::GenerationStatus::Interrupted as i32, "{interrupted:?}");
    assert_eq!(interrupted.reply_to_seq, cut.seq);
    assert!(
        interrupted.text.starts_with(&checkpoint) && TEXT.starts_with(&interrupted.text),
        "{:?} after the checkpoint {checkpoint:?}",
        interrupted.text
    );
    assert!(!interrupted.generation.unwrap().error.is_empty());
    let all = answered(&on_messages[1], &ann, &chat, 6).await;
    let after = all.iter().find(|m| m.role == mpb::MessageRole::Assistant as i32 && m.reply_to_seq == queued.seq);
    assert_eq!(
        after.map(|m| (m.generation_status, m.text.as_str())),
        Some((mpb::GenerationStatus::Complete as i32, "ok")),
        "the prompt queued behind the crash is answered: {all:?}"
    );
    assert_eq!(sender(llm.requests().last().unwrap()), 1 - generating, "by the survivor");

    // The killed replica, started again, answers nothing twice; a new
    // prompt is answered once.
    assistants[generating].spawn();
    assistants[generating].channel().await;
    let last = send_until_acked(&on_messages[generating], &ann, &chat, "one more".into()).await;
    let all = answered(&on_messages[0], &ann, &chat, 7).await;
    assert!(all.iter().any(|m| m.reply_to_seq == last.seq && m.role == mpb::MessageRole::Assistant as i32));
    let per_prompt: BTreeMap<String, usize> = llm.requests().iter().fold(BTreeMap::new(), |mut n, r| {
        *n.entry(prompt_of(r)).or_default() += 1;
        n
    });
    let twice: HashMap<&String, &usize> = per_prompt.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "prompts sent to the model more than once: {twice:?}");
    assert_eq!(per_prompt.len(), prompts.len() + 4, "{per_prompt:?}");

    drop(stream);
    drop(assistants);
    drop(messages);
    drop(chats);
    drop(sessions);
    drop_schemas(&db, &prefix).await;
}
