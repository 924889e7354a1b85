//! The automerge-repo wire protocol, version 1: ids, messages and their CBOR
//! codec. Pure data; no IO.

mod cbor_json;
mod codec;
mod ids;
mod message;

pub use cbor_json::{cbor_to_json, json_to_cbor, PayloadError};
pub use codec::{decode, encode, DecodeError, MAX_NESTING};
pub use ids::{
    decode_head, encode_head, AutomergeUrl, DocumentId, IdError, PeerId, SessionId, StorageId,
    MAX_DOCUMENT_ID_BYTES, MAX_NAME_BYTES,
};
pub use message::{
    DocMessage, EphemeralMessage, Message, PeerMetadata, RemoteHeads, PROTOCOL_VERSION,
};
