//! CBOR ↔ JSON for application payloads (ephemeral `data`, presence).
//!
//! automerge-repo puts cbor-x encoded JavaScript values in ephemeral
//! messages. These convert between that and `serde_json::Value`: maps with
//! text keys, arrays, strings, numbers, booleans, null; byte strings become
//! arrays of numbers, `undefined` becomes null, tags are skipped over.

use minicbor::data::Type;
use minicbor::{Decoder, Encoder};
use serde_json::{Map, Number, Value as Json};

use super::codec::{for_each_item, map_entries, DecodeError, MAX_NESTING};

/// Why a payload is not convertible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload is not JSON-like CBOR: {0}")]
pub struct PayloadError(String);

/// Encodes a JSON value as CBOR (maps in cbor-x's `0xb9` form).
pub fn json_to_cbor(value: &Json) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf);
    write(&mut e, value);
    buf
}

fn write(e: &mut Encoder<&mut Vec<u8>>, value: &Json) {
    // Writing to a Vec cannot fail.
    let _ = match value {
        Json::Null => e.null().map(drop),
        Json::Bool(b) => e.bool(*b).map(drop),
        Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) if u <= u64::from(u32::MAX) => e.u64(u).map(drop),
            (_, Some(i), _) if i >= i64::from(i32::MIN) && i < 0 => e.i64(i).map(drop),
            (_, _, Some(f)) => e.f64(f).map(drop),
            _ => e.null().map(drop),
        },
        Json::String(s) => e.str(s).map(drop),
        Json::Array(items) => {
            let _ = e.array(items.len() as u64);
            for item in items {
                write(e, item);
            }
            Ok(())
        }
        Json::Object(map) => {
            let len = u16::try_from(map.len()).unwrap_or(u16::MAX);
            let [hi, lo] = len.to_be_bytes();
            e.writer_mut().extend_from_slice(&[0xb9, hi, lo]);
            for (k, v) in map.iter().take(usize::from(len)) {
                let _ = e.str(k);
                write(e, v);
            }
            Ok(())
        }
    };
}

/// Decodes a CBOR payload into JSON.
pub fn cbor_to_json(bytes: &[u8]) -> Result<Json, PayloadError> {
    let mut d = Decoder::new(bytes);
    let value = read(&mut d, 0).map_err(err)?;
    if d.position() != bytes.len() {
        return Err(PayloadError("trailing bytes".into()));
    }
    Ok(value)
}

fn err(e: impl std::fmt::Display) -> PayloadError {
    PayloadError(e.to_string())
}

/// Reads one item, using the message codec's bounded walkers for arrays
/// and maps (so nesting limits and indefinite lengths behave the same).
fn read(d: &mut Decoder<'_>, depth: usize) -> Result<Json, DecodeError> {
    if depth > MAX_NESTING {
        return Err(DecodeError::TooDeep);
    }
    Ok(match d.datatype()? {
        Type::Null | Type::Undefined => {
            d.skip()?;
            Json::Null
        }
        Type::Bool => Json::Bool(d.bool()?),
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => Json::from(d.u64()?),
        Type::I8 | Type::I16 | Type::I32 | Type::I64 => Json::from(d.i64()?),
        Type::F16 | Type::F32 | Type::F64 => {
            let f = d.f64()?;
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                Json::from(f as i64)
            } else {
                Number::from_f64(f).map(Json::Number).unwrap_or(Json::Null)
            }
        }
        Type::String => Json::String(d.str()?.to_owned()),
        Type::StringIndef => {
            let mut s = String::new();
            for part in d.str_iter()? {
                s.push_str(part?);
            }
            Json::String(s)
        }
        Type::Bytes => Json::Array(d.bytes()?.iter().map(|b| Json::from(*b)).collect()),
        Type::Array | Type::ArrayIndef => {
            let mut out = Vec::new();
            for_each_item(d, "payload", |d| {
                out.push(read(d, depth + 1)?);
                Ok(())
            })?;
            Json::Array(out)
        }
        Type::Map | Type::MapIndef => {
            let mut out = Map::new();
            map_entries(d, "payload", |d| {
                let key = match read(d, depth + 1)? {
                    Json::String(s) => s,
                    other => other.to_string(),
                };
                let value = read(d, depth + 1)?;
                out.insert(key, value);
                Ok(())
            })?;
            Json::Object(out)
        }
        Type::Tag => {
            d.tag()?;
            read(d, depth + 1)?
        }
        other => return Err(DecodeError::Cbor(format!("unsupported CBOR item {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_survives_a_round_trip() {
        let v = json!({"__presence": {"type": "update", "channel": "cursor", "value": {"line": 1, "x": -2, "f": 1.5, "ok": true, "n": null, "list": [1, "a"]}}});
        assert_eq!(cbor_to_json(&json_to_cbor(&v)), Ok(v));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&[0xff][..], &[0xb9, 0xff, 0xff], &[0x9f; 64]] {
            assert!(cbor_to_json(bytes).is_err());
        }
    }
}
