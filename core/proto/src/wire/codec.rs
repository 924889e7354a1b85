//! CBOR encoding of [`Message`]s, byte-compatible with automerge-repo.
//!
//! automerge-repo encodes with cbor-x: definite-length maps with text keys,
//! untagged byte strings, integers in their shortest form and any number
//! that does not fit in 32 bits as a float64. [`encode`] writes the same
//! bytes, keys in the order the JS code builds its objects, so a message
//! that came from JavaScript re-encodes to the bytes it arrived as.
//!
//! [`decode`] is lenient where automerge-repo is: keys in any order, unknown
//! keys skipped, `null` or `undefined` for an absent optional field,
//! integers or floats for numbers, indefinite-length items, `metadata` as an
//! old name of `peerMetadata`. It is strict where safety needs it: nesting
//! is bounded, every length is checked against the input, and nothing in
//! here can panic on any input.

use minicbor::data::Type;
use minicbor::{Decoder, Encoder};

use super::ids::{DocumentId, IdError, PeerId, SessionId, StorageId};
use super::message::{DocMessage, EphemeralMessage, Message, PeerMetadata, RemoteHeads};

/// Deepest nesting accepted anywhere in a message (unknown keys included).
pub const MAX_NESTING: usize = 16;

/// Largest integer a float64 represents exactly; numbers above it are not
/// accepted as counts.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why bytes could not be read as a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not well-formed CBOR (or end early).
    #[error("not valid CBOR: {0}")]
    Cbor(String),
    /// The top-level item is not a map.
    #[error("message is not a CBOR map")]
    NotAMap,
    /// A required field is absent (or `null`).
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field holds the wrong kind of value.
    #[error("field `{field}` should be {expected}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What it should hold.
        expected: &'static str,
    },
    /// A field holds an id that does not parse.
    #[error("field `{field}`: {source}")]
    BadId {
        /// The field.
        field: &'static str,
        /// Why the id is bad.
        #[source]
        source: IdError,
    },
    /// Nested deeper than [`MAX_NESTING`].
    #[error("message nests deeper than {MAX_NESTING} levels")]
    TooDeep,
    /// Bytes follow the message.
    #[error("{0} bytes follow the message")]
    TrailingBytes(usize),
    /// A `type` this crate does not know. Peers drop such messages rather
    /// than failing the connection, so newer peers can add types.
    #[error("unknown message type `{0}`")]
    UnknownType(String),
}

impl From<minicbor::decode::Error> for DecodeError {
    fn from(e: minicbor::decode::Error) -> Self {
        DecodeError::Cbor(e.to_string())
    }
}

// ---------------------------------------------------------------- encoding

/// Encodes a message as one CBOR map, as automerge-repo would.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(encoded_len_hint(message));
    let mut e = Encoder::new(&mut buf);
    // Writing into a Vec cannot fail, so the results below are infallible;
    // `write_message` returns the first error only to satisfy the types.
    let _ = write_message(&mut e, message);
    buf
}

fn encoded_len_hint(message: &Message) -> usize {
    match message {
        Message::Sync(m) | Message::Request(m) => m.data.len() + 128,
        Message::Ephemeral(m) => m.data.len() + 160,
        _ => 128,
    }
}

type EncResult = Result<(), minicbor::encode::Error<std::convert::Infallible>>;

/// cbor-x (as automerge-repo configures it) writes every map header in the
/// three-byte form `0xb9 <u16 length>`, however short the map. We do the
/// same so our bytes match theirs exactly.
fn map_header(e: &mut Encoder<&mut Vec<u8>>, len: usize) {
    let len = u16::try_from(len).unwrap_or(u16::MAX);
    let [hi, lo] = len.to_be_bytes();
    e.writer_mut().extend_from_slice(&[0xb9, hi, lo]);
}

fn write_message(e: &mut Encoder<&mut Vec<u8>>, message: &Message) -> EncResult {
    // Key order follows the objects automerge-repo 2.5 builds, as captured
    // in tests/fixtures/wire.
    match message {
        Message::Join {
            sender_id,
            metadata,
            supported_protocol_versions,
        } => {
            map_header(
                e,
                2 + usize::from(metadata.is_some())
                    + usize::from(supported_protocol_versions.is_some()),
            );
            e.str("type")?.str("join")?;
            e.str("senderId")?.str(sender_id.as_str())?;
            if let Some(meta) = metadata {
                e.str("peerMetadata")?;
                write_metadata(e, meta)?;
            }
            if let Some(versions) = supported_protocol_versions {
                e.str("supportedProtocolVersions")?;
                e.array(versions.len() as u64)?;
                for v in versions {
                    e.str(v)?;
                }
            }
        }
        Message::Peer {
            sender_id,
            target_id,
            metadata,
            selected_protocol_version,
        } => {
            map_header(e, 4 + usize::from(metadata.is_some()));
            e.str("type")?.str("peer")?;
            e.str("senderId")?.str(sender_id.as_str())?;
            if let Some(meta) = metadata {
                e.str("peerMetadata")?;
                write_metadata(e, meta)?;
            }
            e.str("selectedProtocolVersion")?
                .str(selected_protocol_version)?;
            e.str("targetId")?.str(target_id.as_str())?;
        }
        Message::Sync(m) => {
            map_header(e, 5);
            e.str("type")?.str("sync")?;
            e.str("targetId")?.str(m.target_id.as_str())?;
            e.str("data")?.bytes(&m.data)?;
            e.str("documentId")?.str(m.document_id.as_str())?;
            e.str("senderId")?.str(m.sender_id.as_str())?;
        }
        Message::Request(m) => {
            map_header(e, 5);
            e.str("type")?.str("request")?;
            e.str("targetId")?.str(m.target_id.as_str())?;
            e.str("documentId")?.str(m.document_id.as_str())?;
            e.str("data")?.bytes(&m.data)?;
            e.str("senderId")?.str(m.sender_id.as_str())?;
        }
        Message::DocUnavailable {
            sender_id,
            target_id,
            document_id,
        } => {
            map_header(e, 4);
            e.str("type")?.str("doc-unavailable")?;
            e.str("documentId")?.str(document_id.as_str())?;
            e.str("targetId")?.str(target_id.as_str())?;
            e.str("senderId")?.str(sender_id.as_str())?;
        }
        Message::Ephemeral(m) => {
            map_header(e, 7);
            e.str("type")?.str("ephemeral")?;
            e.str("targetId")?.str(m.target_id.as_str())?;
            e.str("documentId")?.str(m.document_id.as_str())?;
            e.str("data")?.bytes(&m.data)?;
            e.str("count")?;
            write_number(e, m.count)?;
            e.str("sessionId")?.str(m.session_id.as_str())?;
            e.str("senderId")?.str(m.sender_id.as_str())?;
        }
        Message::RemoteSubscriptionChange {
            sender_id,
            target_id,
            add,
            remove,
        } => {
            map_header(e, 5);
            e.str("type")?.str("remote-subscription-change")?;
            e.str("targetId")?.str(target_id.as_str())?;
            for (key, list) in [("add", add), ("remove", remove)] {
                e.str(key)?;
                match list {
                    Some(list) => {
                        e.array(list.len() as u64)?;
                        for id in list {
                            e.str(id.as_str())?;
                        }
                    }
                    None => {
                        e.undefined()?;
                    }
                }
            }
            e.str("senderId")?.str(sender_id.as_str())?;
        }
        Message::RemoteHeadsChanged {
            sender_id,
            target_id,
            document_id,
            new_heads,
        } => {
            map_header(e, 5);
            e.str("type")?.str("remote-heads-changed")?;
            e.str("targetId")?.str(target_id.as_str())?;
            e.str("documentId")?.str(document_id.as_str())?;
            e.str("newHeads")?;
            map_header(e, new_heads.len());
            for (storage_id, heads) in new_heads {
                e.str(storage_id.as_str())?;
                map_header(e, 2);
                e.str("heads")?.array(heads.heads.len() as u64)?;
                for h in &heads.heads {
                    e.str(h)?;
                }
                e.str("timestamp")?;
                write_float_or_int(e, heads.timestamp)?;
            }
            e.str("senderId")?.str(sender_id.as_str())?;
        }
        Message::Error {
            sender_id,
            target_id,
            message,
        } => {
            map_header(
                e,
                2 + usize::from(sender_id.is_some()) + usize::from(target_id.is_some()),
            );
            e.str("type")?.str("error")?;
            if let Some(s) = sender_id {
                e.str("senderId")?.str(s.as_str())?;
            }
            e.str("message")?.str(message)?;
            if let Some(t) = target_id {
                e.str("targetId")?.str(t.as_str())?;
            }
        }
        Message::Leave { sender_id } => {
            map_header(e, 2);
            e.str("type")?.str("leave")?;
            e.str("senderId")?.str(sender_id.as_str())?;
        }
    }
    Ok(())
}

/// automerge-repo always writes both keys; a peer without storage sends
/// `storageId: undefined`.
fn write_metadata(e: &mut Encoder<&mut Vec<u8>>, meta: &PeerMetadata) -> EncResult {
    map_header(e, 1 + usize::from(meta.is_ephemeral.is_some()));
    e.str("storageId")?;
    match &meta.storage_id {
        Some(id) => {
            e.str(id.as_str())?;
        }
        None => {
            e.undefined()?;
        }
    }
    if let Some(flag) = meta.is_ephemeral {
        e.str("isEphemeral")?.bool(flag)?;
    }
    Ok(())
}

/// cbor-x writes a JS number that fits in 32 bits as an integer and any
/// larger one as a float64.
fn write_number(e: &mut Encoder<&mut Vec<u8>>, n: u64) -> EncResult {
    if n <= u64::from(u32::MAX) {
        e.u64(n)?;
    } else {
        e.f64(n as f64)?;
    }
    Ok(())
}

fn write_float_or_int(e: &mut Encoder<&mut Vec<u8>>, x: f64) -> EncResult {
    if x.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&x) {
        e.u64(x as u64)?;
    } else if x.fract() == 0.0 && (f64::from(i32::MIN)..0.0).contains(&x) {
        e.i64(x as i64)?;
    } else {
        e.f64(x)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- decoding

/// Decodes one message. The whole input must be the message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut d = Decoder::new(bytes);
    let fields = read_fields(&mut d)?;
    if d.position() != bytes.len() {
        return Err(DecodeError::TrailingBytes(bytes.len() - d.position()));
    }
    fields.into_message()
}

/// The fields of a message map we understand, each still optional.
#[derive(Default)]
struct Fields<'b> {
    kind: Option<String>,
    sender_id: Option<&'b str>,
    target_id: Option<&'b str>,
    document_id: Option<&'b str>,
    data: Option<Vec<u8>>,
    count: Option<u64>,
    session_id: Option<&'b str>,
    metadata: Option<PeerMetadata>,
    supported_versions: Option<Vec<String>>,
    selected_version: Option<String>,
    message: Option<String>,
    add: Option<Vec<StorageId>>,
    remove: Option<Vec<StorageId>>,
    new_heads: Option<Vec<(StorageId, RemoteHeads)>>,
}

fn read_fields<'b>(d: &mut Decoder<'b>) -> Result<Fields<'b>, DecodeError> {
    if !matches!(d.datatype()?, Type::Map | Type::MapIndef) {
        return Err(DecodeError::NotAMap);
    }
    let mut f = Fields::default();
    for_each_entry(d, "message", 0, |d, key| {
        match key {
            "type" => f.kind = opt(d, "type", read_string)?,
            "senderId" => f.sender_id = opt(d, "senderId", read_str)?,
            "targetId" => f.target_id = opt(d, "targetId", read_str)?,
            "documentId" => f.document_id = opt(d, "documentId", read_str)?,
            "data" => f.data = opt(d, "data", read_bytes)?,
            "count" => f.count = opt(d, "count", read_count)?,
            "sessionId" => f.session_id = opt(d, "sessionId", read_str)?,
            "peerMetadata" => f.metadata = opt(d, "peerMetadata", read_metadata)?,
            // The older name; `peerMetadata` wins when both are present.
            "metadata" => {
                let meta = opt(d, "metadata", read_metadata)?;
                if f.metadata.is_none() {
                    f.metadata = meta;
                }
            }
            "supportedProtocolVersions" => {
                f.supported_versions = opt(d, "supportedProtocolVersions", read_string_list)?
            }
            "selectedProtocolVersion" => {
                f.selected_version = opt(d, "selectedProtocolVersion", read_string)?
            }
            "message" => f.message = opt(d, "message", read_string)?,
            "add" => f.add = opt(d, "add", read_storage_ids)?,
            "remove" => f.remove = opt(d, "remove", read_storage_ids)?,
            "newHeads" => f.new_heads = opt(d, "newHeads", read_new_heads)?,
            _ => skip_value(d, 1)?,
        }
        Ok(())
    })?;
    Ok(f)
}

impl<'b> Fields<'b> {
    fn into_message(self) -> Result<Message, DecodeError> {
        let kind = self.kind.clone().ok_or(DecodeError::MissingField("type"))?;
        let message = match kind.as_str() {
            "join" => Message::Join {
                sender_id: self.sender()?,
                metadata: self.metadata,
                supported_protocol_versions: self.supported_versions,
            },
            "peer" => Message::Peer {
                sender_id: self.sender()?,
                target_id: self.target()?,
                metadata: self.metadata.clone(),
                // A missing version means version 1, as with `join`.
                selected_protocol_version: self
                    .selected_version
                    .clone()
                    .unwrap_or_else(|| super::message::PROTOCOL_VERSION.to_owned()),
            },
            "sync" => Message::Sync(self.doc_message()?),
            "request" => Message::Request(self.doc_message()?),
            "doc-unavailable" => Message::DocUnavailable {
                sender_id: self.sender()?,
                target_id: self.target()?,
                document_id: self.document()?,
            },
            "ephemeral" => Message::Ephemeral(EphemeralMessage {
                sender_id: self.sender()?,
                target_id: self.target()?,
                document_id: self.document()?,
                count: self.count.ok_or(DecodeError::MissingField("count"))?,
                session_id: parse_name(self.session_id, "sessionId", SessionId::new)?,
                data: self.data.ok_or(DecodeError::MissingField("data"))?,
            }),
            "remote-subscription-change" => Message::RemoteSubscriptionChange {
                sender_id: self.sender()?,
                target_id: self.target()?,
                add: self.add,
                remove: self.remove,
            },
            "remote-heads-changed" => Message::RemoteHeadsChanged {
                sender_id: self.sender()?,
                target_id: self.target()?,
                document_id: self.document()?,
                new_heads: self
                    .new_heads
                    .ok_or(DecodeError::MissingField("newHeads"))?,
            },
            "error" => Message::Error {
                sender_id: self
                    .sender_id
                    .map(|s| parse_name(Some(s), "senderId", PeerId::new))
                    .transpose()?,
                target_id: self
                    .target_id
                    .map(|s| parse_name(Some(s), "targetId", PeerId::new))
                    .transpose()?,
                message: self.message.unwrap_or_default(),
            },
            "leave" => Message::Leave {
                sender_id: self.sender()?,
            },
            _ => return Err(DecodeError::UnknownType(kind)),
        };
        Ok(message)
    }

    fn sender(&self) -> Result<PeerId, DecodeError> {
        parse_name(self.sender_id, "senderId", PeerId::new)
    }

    fn target(&self) -> Result<PeerId, DecodeError> {
        parse_name(self.target_id, "targetId", PeerId::new)
    }

    fn document(&self) -> Result<DocumentId, DecodeError> {
        let text = self
            .document_id
            .ok_or(DecodeError::MissingField("documentId"))?;
        text.parse().map_err(|source| DecodeError::BadId {
            field: "documentId",
            source,
        })
    }

    fn doc_message(self) -> Result<DocMessage, DecodeError> {
        Ok(DocMessage {
            sender_id: self.sender()?,
            target_id: self.target()?,
            document_id: self.document()?,
            data: self.data.ok_or(DecodeError::MissingField("data"))?,
        })
    }
}

fn parse_name<T>(
    value: Option<&str>,
    field: &'static str,
    make: fn(&str) -> Result<T, IdError>,
) -> Result<T, DecodeError> {
    let text = value.ok_or(DecodeError::MissingField(field))?;
    make(text).map_err(|source| DecodeError::BadId { field, source })
}

/// Reads an optional field: `null` and `undefined` mean absent.
fn opt<'b, T>(
    d: &mut Decoder<'b>,
    field: &'static str,
    read: fn(&mut Decoder<'b>, &'static str) -> Result<T, DecodeError>,
) -> Result<Option<T>, DecodeError> {
    match d.datatype()? {
        Type::Null => {
            d.null()?;
            Ok(None)
        }
        Type::Undefined => {
            d.undefined()?;
            Ok(None)
        }
        _ => read(d, field).map(Some),
    }
}

fn read_str<'b>(d: &mut Decoder<'b>, field: &'static str) -> Result<&'b str, DecodeError> {
    match d.datatype()? {
        Type::String => Ok(d.str()?),
        _ => Err(DecodeError::WrongType {
            field,
            expected: "a definite-length text string",
        }),
    }
}

fn read_string(d: &mut Decoder<'_>, field: &'static str) -> Result<String, DecodeError> {
    match d.datatype()? {
        Type::String => Ok(d.str()?.to_owned()),
        Type::StringIndef => {
            let mut s = String::new();
            for part in d.str_iter()? {
                s.push_str(part?);
            }
            Ok(s)
        }
        _ => Err(DecodeError::WrongType {
            field,
            expected: "a text string",
        }),
    }
}

fn read_bytes(d: &mut Decoder<'_>, field: &'static str) -> Result<Vec<u8>, DecodeError> {
    match d.datatype()? {
        Type::Bytes => Ok(d.bytes()?.to_vec()),
        Type::BytesIndef => {
            let mut v = Vec::new();
            for part in d.bytes_iter()? {
                v.extend_from_slice(part?);
            }
            Ok(v)
        }
        _ => Err(DecodeError::WrongType {
            field,
            expected: "a byte string",
        }),
    }
}

/// A non-negative whole number, written either as an integer or, as
/// cbor-x does above 32 bits, as a float.
fn read_count(d: &mut Decoder<'_>, field: &'static str) -> Result<u64, DecodeError> {
    let wrong = DecodeError::WrongType {
        field,
        expected: "a non-negative whole number",
    };
    match d.datatype()? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => Ok(d.u64()?),
        Type::F16 | Type::F32 | Type::F64 => {
            let x = d.f64()?;
            if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x <= MAX_SAFE_INTEGER as f64 {
                Ok(x as u64)
            } else {
                Err(wrong)
            }
        }
        _ => Err(wrong),
    }
}

fn read_timestamp(d: &mut Decoder<'_>, field: &'static str) -> Result<f64, DecodeError> {
    match d.datatype()? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => Ok(d.u64()? as f64),
        Type::I8 | Type::I16 | Type::I32 | Type::I64 => Ok(d.i64()? as f64),
        Type::F16 | Type::F32 | Type::F64 => Ok(d.f64()?),
        _ => Err(DecodeError::WrongType {
            field,
            expected: "a number",
        }),
    }
}

/// Calls `item` once per element of an array (definite or not).
pub(super) fn for_each_item<'b>(
    d: &mut Decoder<'b>,
    field: &'static str,
    mut item: impl FnMut(&mut Decoder<'b>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len = match d.datatype()? {
        Type::Array | Type::ArrayIndef => d.array()?,
        _ => {
            return Err(DecodeError::WrongType {
                field,
                expected: "an array",
            })
        }
    };
    match len {
        Some(n) => {
            for _ in 0..n {
                item(d)?;
            }
        }
        None => loop {
            if d.datatype()? == Type::Break {
                d.skip()?;
                break;
            }
            item(d)?;
        },
    }
    Ok(())
}

/// Calls `each` once per entry of a map (definite or not); `each` reads
/// the key and the value.
pub(super) fn map_entries<'b>(
    d: &mut Decoder<'b>,
    field: &'static str,
    mut each: impl FnMut(&mut Decoder<'b>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len = match d.datatype()? {
        Type::Map | Type::MapIndef => d.map()?,
        _ => {
            return Err(DecodeError::WrongType {
                field,
                expected: "a map",
            })
        }
    };
    let mut remaining = len;
    loop {
        match remaining {
            Some(0) => break,
            Some(ref mut n) => *n -= 1,
            None => {
                if d.datatype()? == Type::Break {
                    d.skip()?;
                    break;
                }
            }
        }
        each(d)?;
    }
    Ok(())
}

/// Calls `entry` once per key of a map whose keys are text; entries with
/// other keys are skipped.
fn for_each_entry<'b>(
    d: &mut Decoder<'b>,
    field: &'static str,
    depth: usize,
    mut entry: impl FnMut(&mut Decoder<'b>, &'b str) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    map_entries(d, field, |d| {
        if d.datatype()? == Type::String {
            let key = d.str()?;
            entry(d, key)
        } else {
            skip_value(d, depth + 1)?;
            skip_value(d, depth + 1)
        }
    })
}

fn read_string_list(d: &mut Decoder<'_>, field: &'static str) -> Result<Vec<String>, DecodeError> {
    let mut out = Vec::new();
    for_each_item(d, field, |d| {
        out.push(read_string(d, field)?);
        Ok(())
    })?;
    Ok(out)
}

fn read_storage_ids(
    d: &mut Decoder<'_>,
    field: &'static str,
) -> Result<Vec<StorageId>, DecodeError> {
    let mut out = Vec::new();
    for_each_item(d, field, |d| {
        let s = read_str(d, field)?;
        out.push(StorageId::new(s).map_err(|source| DecodeError::BadId { field, source })?);
        Ok(())
    })?;
    Ok(out)
}

fn read_metadata(d: &mut Decoder<'_>, field: &'static str) -> Result<PeerMetadata, DecodeError> {
    let mut meta = PeerMetadata::default();
    for_each_entry(d, field, 1, |d, key| {
        match key {
            "storageId" => {
                meta.storage_id = opt(d, "storageId", read_str)?
                    .map(|s| {
                        StorageId::new(s).map_err(|source| DecodeError::BadId {
                            field: "storageId",
                            source,
                        })
                    })
                    .transpose()?;
            }
            "isEphemeral" => {
                meta.is_ephemeral = opt(d, "isEphemeral", |d, field| match d.datatype()? {
                    Type::Bool => Ok(d.bool()?),
                    _ => Err(DecodeError::WrongType {
                        field,
                        expected: "a boolean",
                    }),
                })?;
            }
            _ => skip_value(d, 2)?,
        }
        Ok(())
    })?;
    Ok(meta)
}

fn read_new_heads(
    d: &mut Decoder<'_>,
    field: &'static str,
) -> Result<Vec<(StorageId, RemoteHeads)>, DecodeError> {
    let mut out = Vec::new();
    for_each_entry(d, field, 1, |d, key| {
        let storage_id =
            StorageId::new(key).map_err(|source| DecodeError::BadId { field, source })?;
        let mut heads = None;
        let mut timestamp = None;
        for_each_entry(d, field, 2, |d, inner| {
            match inner {
                "heads" => heads = opt(d, "heads", read_string_list)?,
                "timestamp" => timestamp = opt(d, "timestamp", read_timestamp)?,
                _ => skip_value(d, 3)?,
            }
            Ok(())
        })?;
        out.push((
            storage_id,
            RemoteHeads {
                heads: heads.ok_or(DecodeError::MissingField("heads"))?,
                timestamp: timestamp.unwrap_or(0.0),
            },
        ));
        Ok(())
    })?;
    Ok(out)
}

/// Skips one item of any kind, refusing to nest deeper than
/// [`MAX_NESTING`] (minicbor's own `skip` has no such bound).
fn skip_value(d: &mut Decoder<'_>, depth: usize) -> Result<(), DecodeError> {
    if depth > MAX_NESTING {
        return Err(DecodeError::TooDeep);
    }
    match d.datatype()? {
        Type::Array | Type::ArrayIndef => for_each_item(d, "", |d| skip_value(d, depth + 1)),
        Type::Map | Type::MapIndef => map_entries(d, "", |d| {
            skip_value(d, depth + 1)?;
            skip_value(d, depth + 1)
        }),
        Type::Tag => {
            d.tag()?;
            skip_value(d, depth + 1)
        }
        Type::Break => Err(DecodeError::Cbor("unexpected break".into())),
        Type::Unknown(b) => Err(DecodeError::Cbor(format!("unknown initial byte {b:#04x}"))),
        // Scalars and strings (definite or not) hold no nested items.
        _ => Ok(d.skip()?),
    }
}
