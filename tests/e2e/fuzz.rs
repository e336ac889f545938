//! Fuzzing, bounded in count and seeded: random but well-formed request
//! messages, built from the API's own descriptors, go (1) straight through
//! each service's decoders and validators, and (2) over a real socket to
//! every public RPC. No input may panic, and none may come back INTERNAL (or
//! UNKNOWN): a refusal is always a code the client can act on.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_proto::sessions::v1 as spb;
use natter_testkit::{Cluster, Flags};
use proptest::prelude::*;
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tonic::Code;

/// The API's message types by full name (`.natter.chats.v1.Chat`).
struct Schema {
    messages: HashMap<String, DescriptorProto>,
    /// (service, method, request type, server streaming) of every public RPC.
    rpcs: Vec<(String, String, String, bool)>,
}

impl Schema {
    fn load() -> Self {
        let set = FileDescriptorSet::decode(natter_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let mut messages = HashMap::new();
        let mut rpcs = Vec::new();
        for file in &set.file {
            let package = file.package();
            for m in &file.message_type {
                index(&mut messages, &format!(".{package}"), m);
            }
            for service in file.service.iter().filter(|s| !s.name().ends_with("InternalService")) {
                for method in &service.method {
                    rpcs.push((
                        format!("{package}.{}", service.name()),
                        method.name().to_owned(),
                        method.input_type().to_owned(),
                        method.server_streaming(),
                    ));
                }
            }
        }
        Self { messages, rpcs }
    }
}

fn index(messages: &mut HashMap<String, DescriptorProto>, scope: &str, m: &DescriptorProto) {
    let name = format!("{scope}.{}", m.name());
    for nested in &m.nested_type {
        index(messages, &name, nested);
    }
    messages.insert(name, m.clone());
}

/// Builds random, well-formed encodings of the API's messages: every field
/// gets a value of its own type, drawn to hit edges (empty, NUL, huge, near
/// a limit, negative, unknown enum values, real ids).
struct Gen<'a> {
    schema: &'a Schema,
    rng: StdRng,
    /// Strings worth trying besides random ones (real ids of the server).
    known: Vec<String>,
}

impl Gen<'_> {
    fn message(&mut self, type_name: &str, depth: u32) -> Vec<u8> {
        let mut buf = Vec::new();
        let Some(m) = self.schema.messages.get(type_name) else { return buf };
        for f in &m.field {
            if self.rng.random_bool(0.3) {
                continue;
            }
            let n = if f.label() == Label::Repeated { self.count() } else { 1 };
            for _ in 0..n {
                self.field(&mut buf, f.number() as u32, f.r#type(), f.type_name(), depth);
            }
        }
        buf
    }

    fn count(&mut self) -> usize {
        match self.rng.random_range(0..20) {
            0 => self.rng.random_range(200..1200),
            1..=3 => 0,
            _ => self.rng.random_range(1..5),
        }
    }

    fn field(&mut self, buf: &mut Vec<u8>, tag: u32, ty: Type, type_name: &str, depth: u32) {
        match ty {
            Type::String | Type::Bytes => {
                let s = self.string();
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(s.len() as u64, buf);
                buf.extend_from_slice(s.as_bytes());
            }
            Type::Message if depth < 4 => {
                let inner = self.message(type_name, depth + 1);
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(inner.len() as u64, buf);
                buf.extend_from_slice(&inner);
            }
            Type::Message | Type::Group => {}
            Type::Double | Type::Fixed64 | Type::Sfixed64 => {
                encode_key(tag, WireType::SixtyFourBit, buf);
                buf.put_u64_le(self.rng.random());
            }
            Type::Float | Type::Fixed32 | Type::Sfixed32 => {
                encode_key(tag, WireType::ThirtyTwoBit, buf);
                buf.put_u32_le(self.rng.random());
            }
            Type::Bool => {
                encode_key(tag, WireType::Varint, buf);
                encode_varint(self.rng.random_range(0..2), buf);
            }
            _ => {
                let v: i64 = match self.rng.random_range(0..8) {
                    0 => -1,
                    1 => i64::from(i32::MIN),
                    2 => i64::from(i32::MAX),
                    3 => i64::MAX,
                    4 => self.rng.random(),
                    _ => self.rng.random_range(0..300),
                };
                encode_key(tag, WireType::Varint, buf);
                encode_varint(v as u64, buf);
            }
        }
    }

    fn string(&mut self) -> String {
        let pick = |rng: &mut StdRng, items: &[&str]| items[rng.random_range(0..items.len())].to_owned();
        match self.rng.random_range(0..16) {
            0 => String::new(),
            1 => "\0".to_owned(),
            2 => format!("a\0{}", uuid::Uuid::now_v7()),
            3 => "x".repeat(self.rng.random_range(200..5000)),
            4 => "é".repeat(self.rng.random_range(100..20_000)),
            5 => uuid::Uuid::now_v7().to_string(),
            6 => uuid::Uuid::nil().to_string(),
            7 if !self.known.is_empty() => self.known[self.rng.random_range(0..self.known.len())].clone(),
            8 => {
                pick(&mut self.rng, &["image/png", "IMAGE/", "image/\u{0}", "text/plain", "https://img.example/a.png"])
            }
            9 => pick(&mut self.rng, &["title", "description", "visibility", "nope", "*", "title.x"]),
            10 => pick(&mut self.rng, &["eyJrIjoxLCJmIjoxfQ", "!!", "e30", "eyJrIjoiXHUwMDAwIiwiZiI6MH0"]),
            11 => {
                let n = self.rng.random_range(1..40);
                (0..n).map(|_| char::from_u32(self.rng.random_range(0..0x11_0000)).unwrap_or('\u{fffd}')).collect()
            }
            _ => format!("s{}", self.rng.random_range(0..1000)),
        }
    }
}

/// Decodes `bytes` as `T` and, when that works, validates it with `check`;
/// the test fails on a panic only (refusals are expected).
fn exercise<T: prost::Message + Default>(bytes: &[u8], check: impl FnOnce(T)) {
    if let Ok(request) = T::decode(bytes) {
        check(request);
    }
}

/// Every pure validator, fed one input encoded as each request type.
fn validate_everything(schema: &Schema, seed: u64, raw: &[u8]) {
    let mut g = Gen { schema, rng: StdRng::seed_from_u64(seed), known: Vec::new() };
    let mut input = |name: &str| -> Vec<u8> { if raw.is_empty() { g.message(name, 0) } else { raw.to_vec() } };
    let chat_limits = natter_chats::domain::Limits::default();
    let message_limits = natter_messages::domain::Limits::default();
    exercise(&input(".natter.sessions.v1.CreateUserRequest"), |r: spb::CreateUserRequest| {
        let _ = natter_sessions::grpc::new_user(&r.username, &r.password, &r.display_name);
    });
    exercise(&input(".natter.sessions.v1.ClaimAccountRequest"), |r: spb::ClaimAccountRequest| {
        let _ = natter_sessions::grpc::new_user(&r.username, &r.password, &r.display_name);
    });
    exercise(&input(".natter.sessions.v1.CreateSessionRequest"), |r: spb::CreateSessionRequest| {
        let _ = natter_sessions::domain::check_credentials(&r.username, &r.password);
    });
    exercise(&input(".natter.sessions.v1.BatchGetUsersRequest"), |r: spb::BatchGetUsersRequest| {
        let _ = natter_sessions::grpc::parse_user_ids(r.user_ids, natter_sessions::grpc::BATCH_GET_USERS_MAX_IDS);
    });
    exercise(&input(".natter.sessions.v1.ListSessionsRequest"), |r: spb::ListSessionsRequest| {
        let _ = natter_kit::paging::page_size("page_size", r.page_size, 50, 200);
        let _ = natter_kit::paging::decode::<String>("page_token", &r.page_token, 0);
    });
    exercise(&input(".natter.chats.v1.CreateChatRequest"), |r: cpb::CreateChatRequest| {
        let _ = natter_chats::grpc::new_chat(r, natter_kit::id::UserId::new_v7(), &chat_limits);
    });
    exercise(&input(".natter.chats.v1.UpdateChatRequest"), |r: cpb::UpdateChatRequest| {
        let _ = natter_chats::grpc::update_chat(r, &chat_limits);
    });
    exercise(&input(".natter.chats.v1.ListChatsRequest"), |r: cpb::ListChatsRequest| {
        let _ = natter_chats::grpc::list_chats(r, natter_kit::id::UserId::new_v7(), &chat_limits);
    });
    exercise(&input(".natter.chats.v1.AddMembersRequest"), |r: cpb::AddMembersRequest| {
        let _ = natter_chats::grpc::add_members(r, &chat_limits);
    });
    exercise(&input(".natter.messages.v1.SendMessageRequest"), |r: mpb::SendMessageRequest| {
        let _ = natter_messages::grpc::send_request(r, &message_limits);
    });
    exercise(&input(".natter.messages.v1.EditMessageRequest"), |r: mpb::EditMessageRequest| {
        let _ = natter_messages::grpc::edit_request(r, &message_limits);
    });
    exercise(&input(".natter.messages.v1.StreamEventsRequest"), |r: mpb::StreamEventsRequest| {
        let _ = natter_messages::grpc::follow_request(r, &natter_messages::registry::StreamLimits::default());
    });
    exercise(&input(".natter.messages.v1.ListMessageRevisionsRequest"), |r: mpb::ListMessageRevisionsRequest| {
        let _ = natter_kit::paging::decode::<i64>("page_token", &r.page_token, 0);
    });
    // Every other public request type at least decodes without a panic.
    macro_rules! decodes {
        ($($package:ident::$ty:ident),* $(,)?) => {
            $(
                let name = format!(".natter.{}.v1.{}", stringify!($package), stringify!($ty));
                exercise(&input(&name), |_: natter_proto::$package::v1::$ty| {});
            )*
        };
    }
    decodes!(
        sessions::GetCurrentSessionRequest,
        sessions::RevokeSessionRequest,
        sessions::GetUserRequest,
        chats::GetChatRequest,
        chats::ArchiveChatRequest,
        chats::UnarchiveChatRequest,
        chats::DeleteChatRequest,
        chats::AddMembersRequest,
        chats::RemoveMemberRequest,
        chats::UpdateMemberRequest,
        chats::ListMembersRequest,
        messages::ListMessagesRequest,
        messages::GetMessageRequest,
        messages::DeleteMessageRequest,
        messages::MarkReadRequest,
    );
}

fn schema() -> &'static Schema {
    static SCHEMA: std::sync::OnceLock<Schema> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(Schema::load)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn well_formed_random_requests_never_panic_a_validator(seed in any::<u64>()) {
        validate_everything(schema(), seed, &[]);
    }

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder_or_validator(raw in proptest::collection::vec(any::<u8>(), 1..512)) {
        validate_everything(schema(), 0, &raw);
    }

    #[test]
    fn arbitrary_page_tokens_are_refused_cleanly(token in ".{0,300}", key in any::<(i64, String)>()) {
        let _ = natter_kit::paging::decode::<(i64, String)>("page_token", &token, 7);
        let forged = natter_kit::paging::encode(&key, 7);
        if let Ok(Some((_, s))) = natter_kit::paging::decode::<(i64, String)>("page_token", &forged, 7) {
            prop_assert!(!s.contains('\0'), "a NUL key must not pass");
        }
    }
}

/// Passes encoded messages through unchanged, for a client that speaks raw
/// protobuf to any method.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawCoder;

impl tonic::codec::Encoder for RawCoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCoder;
    type Decoder = RawCoder;

    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }

    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

/// Calls per public RPC.
const CALLS_PER_RPC: usize = 24;

/// Rates off: the fuzzer is one client at machine speed and should reach
/// the code behind the limits.
pub(crate) const FLAGS: Flags<'static> = Flags {
    // Random passwords to DeleteAccount count as failed log-ins: no back-off
    // may keep the next RPC's log-in out.
    sessions: &[
        "--create-session-rate",
        "off",
        "--create-guest-rate",
        "off",
        "--create-user-rate",
        "off",
        "--login-backoff",
        "0s",
        "--login-retry-rate",
        "off",
    ],
    chats: &["--create-chat-rate", "off"],
    messages: &["--send-message-rate", "off", "--edit-message-rate", "off", "--stream-open-rate", "off"],
    assistant: &[],
    edge: &[],
};

mod over_the_wire {
    crate::both_modes!(flags = crate::fuzz::FLAGS; random_requests_to_every_public_rpc_never_fail_internally);

    async fn random_requests_to_every_public_rpc_never_fail_internally(c: &natter_testkit::Cluster) {
        super::random_requests(c).await;
    }
}

async fn random_requests(c: &Cluster) {
    let schema = schema();
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = crate::chats::direct(c, &alice, &bob).await;
    let message = crate::chats::send(c, &alice, &chat.id, "hello").await;
    let known = vec![chat.id.clone(), message.id.clone(), bob.id.clone(), alice.id.clone(), alice.session_id.clone()];
    let mut g = Gen { schema, rng: StdRng::seed_from_u64(0x6e61_7474_6572), known };
    let mut grpc = tonic::client::Grpc::new(c.channel());
    let mut failures = Vec::new();
    let mut calls = 0;
    assert!(schema.rpcs.len() >= 25, "every public RPC: {}", schema.rpcs.len());
    for (service, method, request_type, streaming) in &schema.rpcs {
        // A fresh session each time: the fuzzer may revoke the last one.
        let login =
            spb::CreateSessionRequest { username: alice.username.clone(), password: "correct horse battery".into() };
        let token = c.sessions().create_session(login).await.expect("log in").into_inner().token;
        let path: http::uri::PathAndQuery = format!("/{service}/{method}").parse().expect("path");
        for i in 0..CALLS_PER_RPC {
            let body = Bytes::from(g.message(request_type, 0));
            let request = if i % 6 == 0 { tonic::Request::new(body) } else { natter_testkit::with_token(&token, body) };
            grpc.ready().await.expect("channel ready");
            let outcome = if *streaming {
                grpc.server_streaming(request, path.clone(), RawCodec).await.map(drop)
            } else {
                grpc.unary(request, path.clone(), RawCodec).await.map(drop)
            };
            calls += 1;
            if let Err(status) = outcome
                && matches!(status.code(), Code::Internal | Code::Unknown)
            {
                failures.push(format!("{method}: {status:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {calls} calls failed internally:\n{}", failures.len(), failures.join("\n"));
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel());
    let health = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() });
    let health = tokio::time::timeout(Duration::from_secs(10), health).await.expect("health answers").expect("health");
    assert_eq!(health.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}
