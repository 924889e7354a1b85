//! Identifiers that travel on the wire or in URLs.
//!
//! automerge-repo writes a document id as *base58check*: the raw id bytes
//! (normally a 16-byte UUID) followed by the first four bytes of their double
//! SHA-256, the whole rendered in the Bitcoin base58 alphabet. Apps see it
//! inside an `automerge:` URL, which may pin a version with `#head|head…`
//! where every head is a base58check-encoded 32-byte change hash.
//!
//! Peer, storage and session ids are opaque strings chosen by each process.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use automerge::ChangeHash;

/// Longest document id payload we accept, in bytes. Real ids are 16 bytes;
/// anything much longer is hostile or a bug and would bloat storage keys.
pub const MAX_DOCUMENT_ID_BYTES: usize = 64;

/// Longest peer, storage or session id we accept, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Why an id or URL could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Not valid base58, or the four check bytes do not match.
    #[error("`{0}` is not a base58check string")]
    NotBase58Check(String),
    /// Decoded to zero bytes or more than [`MAX_DOCUMENT_ID_BYTES`].
    #[error("document id has {0} bytes; expected 1 to {MAX_DOCUMENT_ID_BYTES}")]
    BadLength(usize),
    /// A URL that does not start with `automerge:`.
    #[error("`{0}` is not an automerge: URL")]
    NotAutomergeUrl(String),
    /// A `#heads` part holding something other than 32-byte change hashes.
    #[error("bad head `{0}` in automerge: URL")]
    BadHead(String),
    /// An empty or over-long peer/storage/session id.
    #[error("id must be 1 to {MAX_NAME_BYTES} bytes, got {0}")]
    BadName(usize),
}

fn decode_base58check(s: &str) -> Result<Vec<u8>, IdError> {
    bs58::decode(s)
        .with_check(None)
        .into_vec()
        .map_err(|_| IdError::NotBase58Check(s.to_owned()))
}

fn encode_base58check(bytes: &[u8]) -> String {
    bs58::encode(bytes).with_check().into_string()
}

/// The id of one document. Cheap to clone.
#[derive(Clone)]
pub struct DocumentId(Arc<IdForms>);

/// The raw bytes and the base58check text of an id: every message names
/// its document in text, so the text is made once, not per message.
struct IdForms {
    bytes: Box<[u8]>,
    text: Box<str>,
}

impl PartialEq for DocumentId {
    fn eq(&self, other: &Self) -> bool {
        self.0.bytes == other.0.bytes
    }
}

impl Eq for DocumentId {}

impl PartialOrd for DocumentId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DocumentId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.bytes.cmp(&other.0.bytes)
    }
}

impl std::hash::Hash for DocumentId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.bytes.hash(state);
    }
}

impl DocumentId {
    /// Wraps raw id bytes (1 to [`MAX_DOCUMENT_ID_BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        if bytes.is_empty() || bytes.len() > MAX_DOCUMENT_ID_BYTES {
            return Err(IdError::BadLength(bytes.len()));
        }
        Ok(Self::new(bytes))
    }

    fn new(bytes: &[u8]) -> Self {
        Self(Arc::new(IdForms {
            bytes: bytes.into(),
            text: encode_base58check(bytes).into(),
        }))
    }

    /// The base58check text used on the wire and in URLs.
    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// A fresh id from 16 random bytes supplied by the caller (the engine
    /// passes bytes from its seeded generator; nothing here touches the OS).
    pub fn from_random(bytes: [u8; 16]) -> Self {
        Self::new(&bytes)
    }

    /// Document `n` of a numbered set named `set`: the same pair always
    /// gives the same id. Benchmarks name the documents they store and later
    /// ask for this way, across processes. (Feature `test-support`.)
    #[cfg(feature = "test-support")]
    pub fn numbered(n: u64, set: u64) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        bytes[8..].copy_from_slice(&set.to_le_bytes());
        Self::from_random(bytes)
    }

    /// The raw id bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    /// The `automerge:` URL naming the latest version of this document.
    pub fn url(&self) -> AutomergeUrl {
        AutomergeUrl {
            document_id: self.clone(),
            heads: None,
        }
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocumentId({self})")
    }
}

impl FromStr for DocumentId {
    type Err = IdError;

    /// Parses the bare base58check form used on the wire. Also accepts a
    /// full `automerge:` URL, ignoring any heads.
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.starts_with(AutomergeUrl::SCHEME) {
            return Ok(s.parse::<AutomergeUrl>()?.document_id);
        }
        let bytes = decode_base58check(s)?;
        if bytes.is_empty() || bytes.len() > MAX_DOCUMENT_ID_BYTES {
            return Err(IdError::BadLength(bytes.len()));
        }
        // The text just checked is the canonical form: keep it rather than
        // encoding (and checksumming) the bytes again.
        Ok(Self(Arc::new(IdForms {
            bytes: bytes.into(),
            text: s.into(),
        })))
    }
}

/// An `automerge:<id>` URL, optionally pinned to a version by its heads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutomergeUrl {
    /// The document the URL names.
    pub document_id: DocumentId,
    /// `Some(heads)` when the URL names one version (`#h1|h2`).
    pub heads: Option<Vec<ChangeHash>>,
}

impl AutomergeUrl {
    /// The URL scheme, colon included.
    pub const SCHEME: &'static str = "automerge:";
}

impl fmt::Display for AutomergeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::SCHEME, self.document_id)?;
        if let Some(heads) = &self.heads {
            f.write_str("#")?;
            for (i, head) in heads.iter().enumerate() {
                if i > 0 {
                    f.write_str("|")?;
                }
                f.write_str(&encode_head(head))?;
            }
        }
        Ok(())
    }
}

impl FromStr for AutomergeUrl {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let rest = s
            .strip_prefix(Self::SCHEME)
            .ok_or_else(|| IdError::NotAutomergeUrl(s.to_owned()))?;
        let (id, heads) = match rest.split_once('#') {
            Some((id, heads)) => (id, Some(heads)),
            None => (rest, None),
        };
        let document_id = DocumentId::from_bytes(&decode_base58check(id)?)?;
        let heads = match heads {
            None => None,
            Some("") => Some(Vec::new()),
            Some(list) => Some(list.split('|').map(decode_head).collect::<Result<_, _>>()?),
        };
        Ok(Self { document_id, heads })
    }
}

/// Renders a change hash the way automerge-repo 2.x puts heads in URLs and
/// in `remote-heads-changed` messages: base58check of the 32 hash bytes.
pub fn encode_head(head: &ChangeHash) -> String {
    encode_base58check(&head.0)
}

/// The inverse of [`encode_head`].
pub fn decode_head(s: &str) -> Result<ChangeHash, IdError> {
    let bytes = decode_base58check(s).map_err(|_| IdError::BadHead(s.to_owned()))?;
    let array: [u8; 32] = bytes
        .try_into()
        .map_err(|_| IdError::BadHead(s.to_owned()))?;
    Ok(ChangeHash(array))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a name of 1 to [`MAX_NAME_BYTES`] bytes.
            pub fn new(name: &str) -> Result<Self, IdError> {
                if name.is_empty() || name.len() > MAX_NAME_BYTES {
                    return Err(IdError::BadName(name.len()));
                }
                Ok(Self(Arc::from(name)))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

name_type!(
    /// Names one peer (one running repo) for the length of its life.
    PeerId
);
name_type!(
    /// Names one storage location; stable across restarts of the peer that
    /// owns it. Sync state is persisted per storage id.
    StorageId
);
name_type!(
    /// Names one process lifetime of a peer; used to order its ephemeral
    /// messages together with their `count`.
    SessionId
);

impl SessionId {
    /// Wraps a name this crate generated itself (never empty, short).
    pub(crate) fn from_trusted(name: String) -> Self {
        Self(Arc::from(name))
    }
}

impl StorageId {
    /// Whether the id is safe to use as a component of a storage key:
    /// letters, digits, `-` and `_`, at most 128 bytes (UUIDs qualify).
    /// Sync state is persisted only for peers whose storage id passes.
    pub fn is_key_safe(&self) -> bool {
        self.0.len() <= 128
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_id_round_trips_through_text_and_url() {
        let id = DocumentId::from_random([7; 16]);
        let text = id.to_string();
        assert_eq!(text.parse::<DocumentId>(), Ok(id.clone()));
        let url = id.url().to_string();
        assert!(url.starts_with("automerge:"));
        assert_eq!(url.parse::<AutomergeUrl>().map(|u| u.document_id), Ok(id));
    }

    #[test]
    fn url_with_heads_round_trips() {
        let url = AutomergeUrl {
            document_id: DocumentId::from_random([1; 16]),
            heads: Some(vec![ChangeHash([3; 32]), ChangeHash([4; 32])]),
        };
        let text = url.to_string();
        assert_eq!(text.matches('|').count(), 1);
        assert_eq!(text.parse::<AutomergeUrl>(), Ok(url));
    }

    #[test]
    fn corrupted_check_bytes_are_rejected() {
        let mut text = DocumentId::from_random([9; 16]).to_string();
        let last = text.pop().map(|c| if c == '2' { '3' } else { '2' });
        text.extend(last);
        assert!(matches!(
            text.parse::<DocumentId>(),
            Err(IdError::NotBase58Check(_))
        ));
        assert!("automerge:".parse::<AutomergeUrl>().is_err());
        assert!("http://x".parse::<AutomergeUrl>().is_err());
        assert!("automerge:2j9PSNFt9yA5yQcUGBAJ1jFbAcJb#abc"
            .parse::<AutomergeUrl>()
            .is_err());
    }

    #[test]
    fn storage_ids_with_path_characters_are_not_key_safe() {
        assert!(StorageId::new("3f1c1a6e-0d4b-4c1e-9a57-1b2c3d4e5f60")
            .expect("valid")
            .is_key_safe());
        assert!(!StorageId::new("../etc").expect("valid").is_key_safe());
        assert!(StorageId::new("").is_err());
    }
}
