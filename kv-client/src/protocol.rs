//! The client protocol: requests and responses, as `rkyv` archives in frames
//! (see [`crate::frame`] and `docs/protocol.md`).
//!
//! A connection negotiates the protocol version by ALPN ([`ALPN_CLIENT`]).
//! Its first bidirectional stream carries [`Request::Hello`] with the
//! client's token; every later request opens its own bidirectional stream,
//! sends one request frame and reads one response frame.

pub use crate::wire::{
    Compare, CompareOp, CompareTarget, Consistency, ErrorCode, ErrorInfo, EventKind, KeyMeta, KeyValue, MemberInfo,
    Request, Response, Session, SnapshotFile, SnapshotHeader, StatusInfo, TxnOp, TxnOpResult, WatchEnd, WatchEvent,
    WriteOp,
};

/// ALPN of the client protocol, version 1. The version is the suffix: a
/// server that speaks several versions offers each, and the handshake picks one.
pub const ALPN_CLIENT: &[u8] = b"cairn-client/1";
/// ALPN of the peer protocol (node to node), version 2. Version 2 (the
/// snapshot acknowledgement gained `pending`) cannot decode version 1's
/// frames, so a node of an older build is refused at the handshake, with
/// TLS's "no application protocol", rather than failing mid-transfer.
pub const ALPN_PEER: &[u8] = b"cairn-peer/2";
/// The server name clients check in a node's certificate (every node
/// certificate carries it beside its own `node-<id>.cairn`).
pub const SERVER_NAME: &str = "server.cairn";

/// Longest key by default, in bytes (the server's limit is configurable
/// down, never up): 64 KiB less 16 bytes, the room a node's state keeps for
/// the prefixes it stores a key under (cairn-lsm takes keys of at most
/// 64 KiB).
pub const KEY_BYTES_MAX: usize = (64 << 10) - 16;
/// Longest value by default, in bytes.
pub const VALUE_BYTES_MAX: usize = 1 << 20;
