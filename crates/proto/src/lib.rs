//! Generated code for natter's API: one module per protobuf package, plus the
//! encoded file descriptor set that server reflection serves.
//!
//! Nothing here is written by hand except these module declarations.

// The docs are the .proto files' comments, written for every language's
// readers: their `"chat:<id>"` subjects are text, not HTML tags.
#![allow(unreachable_pub, clippy::all, rustdoc::invalid_html_tags)]

/// `natter.sessions.v1`: users, credentials, sessions.
pub mod sessions {
    /// Version 1 of the sessions API.
    pub mod v1 {
        tonic::include_proto!("natter.sessions.v1");
    }
}

/// `natter.chats.v1`: chats and membership.
pub mod chats {
    /// Version 1 of the chats API.
    pub mod v1 {
        tonic::include_proto!("natter.chats.v1");
    }
}

/// `natter.messages.v1`: messages, read positions, the event stream.
pub mod messages {
    /// Version 1 of the messages API.
    pub mod v1 {
        tonic::include_proto!("natter.messages.v1");
    }
}

/// `natter.assistant.v1`: the AI assistant's replies.
pub mod assistant {
    /// Version 1 of the assistant API.
    pub mod v1 {
        tonic::include_proto!("natter.assistant.v1");
    }
}

/// The encoded `google.protobuf.FileDescriptorSet` of natter's public API
/// (`SessionService`, `ChatService`, `MessageService`, `AssistantService` and the well-known
/// types they import): what server reflection on a public port serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/natter_public_descriptor.bin"));

/// The encoded `google.protobuf.FileDescriptorSet` of every natter proto,
/// the `*InternalService`s included: what reflection on an internal listener
/// serves.
pub const INTERNAL_FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/natter_descriptor.bin"));

pub use prost_types::{FieldMask, Timestamp};
