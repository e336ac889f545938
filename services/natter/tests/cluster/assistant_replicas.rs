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
    Event, Node, authed, credential_file, drop_schemas, env, free_port, next, send_until_acked, shared_store,
    store_bus_and_a_clock_ahead, user,
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

/// One split deployment's shared settings: each process's internal port
/// (by index), its PostgreSQL schemas and NATS, and the service credential.
struct Split {
    db: String,
    nats: String,
    prefix: String,
    credential: String,
    _secrets: tempfile::TempDir,
    internal: Vec<u16>,
}

impl Split {
    /// For `processes` processes, on schemas named after `tag`.
    fn new(db: String, nats: String, tag: char, processes: usize) -> Self {
        let secrets = tempfile::tempdir().unwrap();
        Self {
            db,
            nats,
            prefix: format!("{tag}{}_", uuid::Uuid::new_v4().simple()),
            credential: credential_file(secrets.path()),
            _secrets: secrets,
            internal: (0..processes).map(|_| free_port()).collect(),
        }
    }

    /// Process `i`'s internal listener: what the others call.
    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.internal[i])
    }

    /// Process `i`'s flags: its internal listener, the credential, the
    /// shared store when it has one (`store`), then `more`.
    fn args(&self, i: usize, store: bool, more: &[&str]) -> Vec<String> {
        let mut v = vec![
            "--internal-listen".into(),
            format!("127.0.0.1:{}", self.internal[i]),
            "--service-credential-file".into(),
            self.credential.clone(),
        ];
        if store {
            v.extend(shared_store(&self.db, &self.prefix, &self.nats));
        }
        v.extend(more.iter().map(|s| (*s).to_owned()));
        v
    }

    /// Assistant process `i`'s flags: on sessions `s`, chats `c` and
    /// messages `m` (indexes), the model at `llm`, a 2 s lease (swept every
    /// 2/3 s: a crash is short), then `more`.
    fn assistant(&self, i: usize, [s, c, m]: [usize; 3], llm: &str, more: &[&str]) -> Vec<String> {
        let (s, c, m) = (self.url(s), self.url(c), self.url(m));
        let mut all = vec!["--sessions-url", &s, "--chats-url", &c, "--messages-url", &m, "--assistant-base-url", llm];
        all.extend(["--assistant-lease", "2s"]);
        all.extend(more);
        self.args(i, false, &all)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_assistant_replicas_answer_once_stop_from_either_and_sweep_each_other_s_crash() {
    let (Some(db), Some(nats)) = (env("NATTER_TEST_DATABASE_URL"), env("NATTER_TEST_NATS_URL")) else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL and NATTER_TEST_NATS_URL are not set");
        return;
    };
    let llm = ScriptedServer::start(21).await;
    let split = Split::new(db, nats, 'a', 6);
    let (s, c, m1, m2, a1, a2) = (0, 1, 2, 3, 4, 5);
    let sessions = Node::start("sessions", free_port(), split.args(s, true, &[]));
    let chats = Node::start(
        "chats",
        free_port(),
        split.args(c, true, &["--sessions-url", &split.url(s), "--messages-url", &split.url(m1)]),
    );
    let messages_args =
        |m: usize| split.args(m, true, &["--sessions-url", &split.url(s), "--chats-url", &split.url(c)]);
    let messages = [
        Node::start("messages", free_port(), messages_args(m1)),
        Node::start("messages", free_port(), messages_args(m2)),
    ];
    // Replica i on messages replica i.
    let assistant_args = |i: usize, a: usize, m: usize| {
        split.assistant(a, [s, c, m], llm.url(), &["--assistant-system-prompt", &system_prompt(i)])
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
    let answer = AssistantServiceClient::new(on_assistant[1 - generating].clone())
        .stop_generation(authed(&ann, stop))
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert!(llm.disconnected(slow, Duration::from_secs(5)).await.is_some(), "the stop closed the model's stream");
    let stopped = ended(&mut stream, &reply).await;
    assert_eq!(stopped.generation_status, mpb::GenerationStatus::Stopped as i32, "{stopped:?}");
    assert_eq!(
        (answer.generation_status, answer.text.as_str()),
        (stopped.generation_status, stopped.text.as_str()),
        "StopGeneration answers the reply as it ended, from either replica"
    );
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
    drop_schemas(&split.db, &split.prefix).await;
}

/// A replica whose wall clock is an hour ahead (a host without NTP) must
/// not take a live reply of another replica for one whose generator died:
/// staleness is judged on the store's clock (PostgreSQL's), which stamped
/// the checkpoints. Assistant replica A (right clock, on messages replica
/// M1) generates a long reply; assistant replica B and the messages
/// replica M2 it talks to start with their clocks an hour ahead
/// (libfaketime), and B sweeps through M2 at start-up and every 2/3 s
/// while the reply is written; the reply ends COMPLETE with the whole
/// text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_runs_ahead_interrupts_no_live_reply() {
    let Some((db, nats, skewed)) = store_bus_and_a_clock_ahead() else { return };
    let llm = ScriptedServer::start(22).await;
    let split = Split::new(db, nats, 'k', 6);
    let (s, c, m, a, b, m2) = (0, 1, 2, 3, 4, 5);
    let sessions = Node::start("sessions", free_port(), split.args(s, true, &[]));
    let chats = Node::start(
        "chats",
        free_port(),
        split.args(c, true, &["--sessions-url", &split.url(s), "--messages-url", &split.url(m)]),
    );
    let messages_args =
        |i: usize| split.args(i, true, &["--sessions-url", &split.url(s), "--chats-url", &split.url(c)]);
    let messages = Node::start("messages", free_port(), messages_args(m));
    let replica_a = Node::start("assistant", free_port(), split.assistant(a, [s, c, m], llm.url(), &[]));
    let sessions_ch = sessions.channel().await;
    chats.channel().await;
    let messages_ch = messages.channel().await;
    let on_a = replica_a.channel().await;

    let (_, token) = user(&sessions_ch, "dee").await;
    let chat = AssistantServiceClient::new(on_a)
        .get_or_create_assistant_chat(authed(&token, apb::GetOrCreateAssistantChatRequest {}))
        .await
        .unwrap()
        .into_inner()
        .chat_id;
    let follow = mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut stream = MessageServiceClient::new(messages_ch.clone())
        .stream_events(authed(&token, follow))
        .await
        .unwrap()
        .into_inner();
    llm.push(Script::slow(TEXT, Duration::from_millis(100)));
    send_until_acked(&messages_ch, &token, &chat, "tell me something long".into()).await;
    let reply = first_delta(&mut stream).await;

    // Replica B and its messages replica, their clocks an hour ahead,
    // sweep while A writes.
    let messages_2 = Node::start_with_env("messages", free_port(), messages_args(m2), skewed.clone());
    messages_2.channel().await;
    let replica_b =
        Node::start_with_env("assistant", free_port(), split.assistant(b, [s, c, m2], llm.url(), &[]), skewed);
    replica_b.channel().await;
    let get = mpb::GetMessageRequest { message_id: reply.clone() };
    let now = MessageServiceClient::new(messages_ch.clone()).get_message(authed(&token, get)).await.unwrap();
    let now = now.into_inner().message.unwrap();
    assert_eq!(
        now.generation_status,
        mpb::GenerationStatus::Generating as i32,
        "replica B swept (at start-up) while the reply was written: {now:?}"
    );
    let done = ended(&mut stream, &reply).await;
    assert_eq!(
        (done.generation_status, done.text.as_str()),
        (mpb::GenerationStatus::Complete as i32, TEXT),
        "{done:?}"
    );
    assert_eq!(llm.requests().len(), 1, "asked once");

    drop(stream);
    drop((replica_a, replica_b, messages, messages_2, chats, sessions));
    drop_schemas(&split.db, &split.prefix).await;
}
