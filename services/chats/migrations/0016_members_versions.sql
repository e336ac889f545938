-- The version of a chat's membership as far as departures go: raised,
-- under the chat's row lock, by every RemoveMember or leave, whose outbox
-- entry carries it to the messages service (RecordChatChanges'
-- members_departed) before the call answers. CheckMembership answers the
-- version it read, and a send's write refuses a message checked at a lower
-- version than the one recorded, so no departed member's message is
-- stored after the departure answered. 0 before any departure. The same
-- DDL runs on SQLite and PostgreSQL.
ALTER TABLE chats ADD COLUMN members_version BIGINT NOT NULL DEFAULT 0;
