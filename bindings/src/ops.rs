//! [`ContextOp`]: one edit of a transaction, read through the same JSON
//! form ([`JsonOp`]) as the relay's HTTP API.

use converge_core::context::{JsonOp, Op, ValueType};

use crate::{invalid, parse_json, ConvergeError};

/// One edit in a transaction ([`Context::transact`]). Values are JSON.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum ContextOp {
    /// Sets `path` to a JSON value (strings become collaborative text).
    Set {
        /// Where.
        path: String,
        /// The value, as JSON.
        json: String,
    },
    /// Sets `path` to a counter starting at `value`.
    SetCounter {
        /// Where.
        path: String,
        /// The start value.
        value: i64,
    },
    /// Deletes a map key or list element.
    Delete {
        /// What.
        path: String,
    },
    /// Adds `by` to the counter at `path`.
    Increment {
        /// The counter.
        path: String,
        /// By how much (may be negative).
        by: i64,
    },
    /// Inserts a JSON value into the list at `path` before `index`.
    Insert {
        /// The list.
        path: String,
        /// Before which element (the length appends).
        index: u64,
        /// The value, as JSON.
        json: String,
    },
    /// Removes `count` elements from the list at `path`.
    Remove {
        /// The list.
        path: String,
        /// From where.
        index: u64,
        /// How many.
        count: u64,
    },
    /// Replaces `delete` characters of the text at `path` with `insert`.
    Splice {
        /// The text.
        path: String,
        /// Where, in characters.
        index: u64,
        /// How many characters to delete.
        delete: u64,
        /// What to insert.
        insert: String,
    },
    /// Merges a JSON object into the map at `path` (`null` deletes keys).
    MergeJson {
        /// The map.
        path: String,
        /// The object, as JSON.
        json: String,
    },
}

impl TryFrom<ContextOp> for JsonOp {
    type Error = ConvergeError;

    /// The same JSON form the relay's HTTP API takes, so both read ops
    /// with one parser.
    fn try_from(op: ContextOp) -> Result<JsonOp, ConvergeError> {
        Ok(match op {
            ContextOp::Set { path, json } => JsonOp::Set {
                path,
                value: parse_json(&json)?,
                kind: ValueType::Json,
            },
            ContextOp::SetCounter { path, value } => JsonOp::Set {
                path,
                value: value.into(),
                kind: ValueType::Counter,
            },
            ContextOp::Delete { path } => JsonOp::Delete { path },
            ContextOp::Increment { path, by } => JsonOp::Increment { path, by },
            ContextOp::Insert { path, index, json } => JsonOp::Insert {
                path,
                index,
                value: parse_json(&json)?,
                kind: ValueType::Json,
            },
            ContextOp::Remove { path, index, count } => JsonOp::Remove { path, index, count },
            ContextOp::Splice {
                path,
                index,
                delete,
                insert,
            } => JsonOp::Splice {
                path,
                index,
                delete,
                insert,
            },
            ContextOp::MergeJson { path, json } => JsonOp::Merge {
                path,
                value: parse_json(&json)?,
            },
        })
    }
}

impl TryFrom<ContextOp> for Op {
    type Error = ConvergeError;

    fn try_from(op: ContextOp) -> Result<Op, ConvergeError> {
        JsonOp::try_from(op)?
            .into_op()
            .map_err(|e| invalid(e.to_string()))
    }
}
