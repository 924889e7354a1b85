//! Checks every sync message from a peer before Automerge sees it.
//!
//! Automerge trusts the numbers inside a sync message. Two of them are
//! dangerous: a `have` Bloom filter with entries but zero bits per entry
//! makes the next `generate_sync_message` divide by zero, and a huge probe
//! count makes it allocate (or loop) without bound. Counts of heads, needs
//! and haves drive work that grows with them too. [`decode_sync_message`]
//! decodes the bytes (under `catch_unwind`, in case the decoder itself
//! trips) and refuses anything outside [`SyncLimits`].

use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::sync;

/// Bounds on what one sync message may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncLimits {
    /// Most heads a message may advertise.
    pub max_heads: usize,
    /// Most change hashes a message may ask for.
    pub max_need: usize,
    /// Most `have` summaries in one message (Automerge sends one).
    pub max_haves: usize,
    /// Most hashes in one `have`'s `last_sync`.
    pub max_last_sync: usize,
    /// Most entries a Bloom filter may claim.
    pub max_bloom_entries: u64,
    /// Most bits per entry a Bloom filter may use (Automerge uses 10).
    pub max_bloom_bits_per_entry: u64,
    /// Most probes per lookup (Automerge uses 7).
    pub max_bloom_probes: u64,
    /// Largest change (or chunk of changes) one message may carry, in
    /// bytes.
    pub max_change_bytes: usize,
}

impl Default for SyncLimits {
    fn default() -> Self {
        Self {
            max_heads: 4096,
            max_need: 1 << 16,
            max_haves: 16,
            max_last_sync: 4096,
            max_bloom_entries: 1 << 24,
            max_bloom_bits_per_entry: 64,
            max_bloom_probes: 64,
            max_change_bytes: 64 << 20,
        }
    }
}

/// Why a sync message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidSyncMessage {
    /// Automerge could not decode it.
    #[error("undecodable sync message: {0}")]
    Undecodable(String),
    /// Decoding it panicked inside Automerge.
    #[error("sync message crashed the decoder")]
    DecoderPanicked,
    /// A list is longer than its limit.
    #[error("sync message has {count} {what}; at most {limit} allowed")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// How long it is.
        count: usize,
        /// Its limit.
        limit: usize,
    },
    /// A Bloom filter's parameters are unusable or hostile.
    #[error("bad bloom filter: {0}")]
    BadBloom(String),
    /// A change over [`SyncLimits::max_change_bytes`].
    #[error("a change of {size} bytes; at most {limit} allowed")]
    ChangeTooBig {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// Decodes and validates one sync message.
pub fn decode_sync_message(
    bytes: &[u8],
    limits: &SyncLimits,
) -> Result<sync::Message, InvalidSyncMessage> {
    let decoded = catch_unwind(AssertUnwindSafe(|| sync::Message::decode(bytes)))
        .map_err(|_| InvalidSyncMessage::DecoderPanicked)?
        .map_err(|e| InvalidSyncMessage::Undecodable(e.to_string()))?;
    validate(&decoded, limits)?;
    Ok(decoded)
}

fn check_len(what: &'static str, count: usize, limit: usize) -> Result<(), InvalidSyncMessage> {
    if count > limit {
        Err(InvalidSyncMessage::TooMany { what, count, limit })
    } else {
        Ok(())
    }
}

/// Checks an already-decoded message against the limits.
pub fn validate(message: &sync::Message, limits: &SyncLimits) -> Result<(), InvalidSyncMessage> {
    check_len("heads", message.heads.len(), limits.max_heads)?;
    check_len("needed hashes", message.need.len(), limits.max_need)?;
    check_len("have summaries", message.have.len(), limits.max_haves)?;
    if let Some(size) = message
        .changes
        .iter()
        .map(<[u8]>::len)
        .find(|&n| n > limits.max_change_bytes)
    {
        return Err(InvalidSyncMessage::ChangeTooBig {
            size,
            limit: limits.max_change_bytes,
        });
    }
    for have in &message.have {
        check_len(
            "last-sync hashes",
            have.last_sync.len(),
            limits.max_last_sync,
        )?;
        check_bloom(&have.bloom.to_bytes(), limits)?;
    }
    Ok(())
}

/// A Bloom filter's wire form is three LEB128 numbers (entries, bits per
/// entry, probes) and then the bit array; an empty filter is zero bytes.
fn check_bloom(bytes: &[u8], limits: &SyncLimits) -> Result<(), InvalidSyncMessage> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut rest = bytes;
    let entries = read_leb128(&mut rest)?;
    let bits_per_entry = read_leb128(&mut rest)?;
    let probes = read_leb128(&mut rest)?;
    let bad = |msg: String| Err(InvalidSyncMessage::BadBloom(msg));
    if entries == 0 {
        return Ok(());
    }
    if entries > limits.max_bloom_entries {
        return bad(format!(
            "{entries} entries (limit {})",
            limits.max_bloom_entries
        ));
    }
    if bits_per_entry == 0 || bits_per_entry > limits.max_bloom_bits_per_entry {
        return bad(format!(
            "{bits_per_entry} bits per entry (must be 1 to {})",
            limits.max_bloom_bits_per_entry
        ));
    }
    if probes == 0 || probes > limits.max_bloom_probes {
        return bad(format!(
            "{probes} probes (must be 1 to {})",
            limits.max_bloom_probes
        ));
    }
    if rest.is_empty() {
        return bad("no bits for a non-empty filter".into());
    }
    Ok(())
}

fn read_leb128(input: &mut &[u8]) -> Result<u64, InvalidSyncMessage> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input
            .split_first()
            .ok_or_else(|| InvalidSyncMessage::BadBloom("truncated header".into()))?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(InvalidSyncMessage::BadBloom(
        "header number too long".into(),
    ))
}

/// Builds the hostile Bloom filter bytes that crash an unguarded peer, for
/// tests here and elsewhere: `entries` entries, `bits_per_entry` bits each,
/// `probes` probes, and a bit array of `bits` bytes.
#[cfg(any(test, feature = "test-support"))]
pub fn hostile_bloom_bytes(entries: u32, bits_per_entry: u32, probes: u32, bits: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for mut n in [
        u64::from(entries),
        u64::from(bits_per_entry),
        u64::from(probes),
    ] {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    out.extend(std::iter::repeat_n(0xffu8, bits));
    out
}

/// An encoded v1 sync message that says nothing (no heads, needs, haves or
/// changes): the smallest valid `request` or `sync` payload, for tests.
#[cfg(any(test, feature = "test-support"))]
pub fn empty_sync_message() -> Vec<u8> {
    sync::Message {
        heads: Vec::new(),
        need: Vec::new(),
        have: Vec::new(),
        changes: sync::ChunkList::empty(),
        flags: None,
        version: sync::MessageVersion::V1,
    }
    .encode()
}

/// Wraps Bloom filter bytes into a v1 sync message with no heads, no
/// needs, no changes and one `have` (empty `last_sync`) carrying the filter.
#[cfg(any(test, feature = "test-support"))]
pub fn sync_message_with_bloom(bloom: &[u8]) -> Vec<u8> {
    let mut out = vec![0x42, 0, 0, 1, 0];
    let mut len = bloom.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(bloom);
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::{BloomFilter, Have};
    use automerge::ChangeHash;

    #[test]
    fn honest_messages_pass() {
        let bloom = BloomFilter::from_hashes([ChangeHash([1; 32]), ChangeHash([2; 32])].iter());
        let msg = sync::Message {
            heads: vec![ChangeHash([1; 32])],
            need: vec![],
            have: vec![Have {
                last_sync: vec![],
                bloom,
            }],
            changes: sync::ChunkList::empty(),
            flags: None,
            version: sync::MessageVersion::V1,
        };
        let bytes = msg.encode();
        assert!(decode_sync_message(&bytes, &SyncLimits::default()).is_ok());
    }

    #[test]
    fn zero_bits_per_entry_is_refused() {
        let bytes = sync_message_with_bloom(&hostile_bloom_bytes(5, 0, 7, 0));
        let err = decode_sync_message(&bytes, &SyncLimits::default()).expect_err("hostile");
        assert!(matches!(err, InvalidSyncMessage::BadBloom(_)), "{err}");
    }

    #[test]
    fn huge_probe_count_is_refused() {
        let bytes = sync_message_with_bloom(&hostile_bloom_bytes(1, 10, u32::MAX, 2));
        let err = decode_sync_message(&bytes, &SyncLimits::default()).expect_err("hostile");
        assert!(matches!(err, InvalidSyncMessage::BadBloom(_)), "{err}");
    }

    #[test]
    fn garbage_is_undecodable_not_a_panic() {
        for bytes in [
            &b""[..],
            &[0x42],
            &[0x42, 0xff, 0xff, 0xff],
            &[0x00, 1, 2, 3],
        ] {
            assert!(decode_sync_message(bytes, &SyncLimits::default()).is_err());
        }
    }
}
