//! [`JsonOp`]: an [`Op`] as JSON, the one form the relay's HTTP API and the
//! bindings read edits in.
//!
//! An op is an object tagged by `op`, with a JSON Pointer `path` and the
//! fields that kind needs:
//!
//! | `op` | fields |
//! |---|---|
//! | `set` | `value`, optional `type` |
//! | `delete` | |
//! | `increment` | optional `by` (default 1) |
//! | `insert` | `index`, `value`, optional `type` |
//! | `remove` | `index`, optional `count` (default 1) |
//! | `splice` | `index`, optional `delete` (default 0), optional `insert` (default `""`) |
//! | `merge` | `value` (an object) |
//!
//! `type` says how `value` is stored ([`ValueType`]); without it a value is
//! taken as JSON, where strings become collaborative text. Fields an op does
//! not use are ignored.
//!
//! ```
//! use converge_proto::context::{JsonOp, Op, Value};
//!
//! let op: JsonOp = serde_json::from_str(
//!     r#"{"op": "set", "path": "/hits", "value": 0, "type": "counter"}"#,
//! )?;
//! assert_eq!(
//!     op.into_op()?,
//!     Op::Set { path: "/hits".parse()?, value: Value::Counter(0) },
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{BadPath, Op, Path, Value};

/// One edit as JSON (see the [module docs](self) for the shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum JsonOp {
    /// Put a value at a map key or list index ([`Op::Set`]).
    Set {
        /// Where (a JSON Pointer).
        path: String,
        /// What.
        value: Json,
        /// How to store `value`.
        #[serde(default, rename = "type")]
        kind: ValueType,
    },
    /// Remove a map key or list element ([`Op::Delete`]).
    Delete {
        /// Where.
        path: String,
    },
    /// Add to a counter ([`Op::Increment`]).
    Increment {
        /// The counter.
        path: String,
        /// By how much.
        #[serde(default = "one_i64")]
        by: i64,
    },
    /// Insert into a list ([`Op::Insert`]).
    Insert {
        /// The list.
        path: String,
        /// Before which element.
        index: u64,
        /// What.
        value: Json,
        /// How to store `value`.
        #[serde(default, rename = "type")]
        kind: ValueType,
    },
    /// Remove list elements ([`Op::Remove`]).
    Remove {
        /// The list.
        path: String,
        /// From where.
        index: u64,
        /// How many.
        #[serde(default = "one_u64")]
        count: u64,
    },
    /// Replace characters of a text ([`Op::Splice`]).
    Splice {
        /// The text.
        path: String,
        /// Where, in characters.
        index: u64,
        /// How many to delete.
        #[serde(default)]
        delete: u64,
        /// What to insert.
        #[serde(default)]
        insert: String,
    },
    /// Merge a JSON object into a map ([`Op::MergeJson`]).
    Merge {
        /// The map.
        path: String,
        /// The object to merge.
        value: Json,
    },
}

fn one_i64() -> i64 {
    1
}

fn one_u64() -> u64 {
    1
}

/// How a JSON value is stored: the `type` field of a [`JsonOp`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// As JSON ([`Value::from_json`]): strings become text. The default.
    #[default]
    Json,
    /// An immutable string (needs a JSON string).
    String,
    /// Collaborative text (needs a JSON string).
    Text,
    /// A counter (needs an integer).
    Counter,
    /// Milliseconds since the epoch (needs an integer).
    Timestamp,
    /// An integer.
    Int,
    /// A float (needs a number).
    Float,
    /// Bytes (needs a hex string).
    Bytes,
}

impl ValueType {
    /// `value` stored as this type.
    pub fn value(self, value: &Json) -> Result<Value, JsonOpError> {
        let wrong = |needs: &'static str| JsonOpError::WrongValue { kind: self, needs };
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or(wrong("a JSON string"))
        };
        let int = || value.as_i64().ok_or(wrong("an integer"));
        Ok(match self {
            ValueType::Json => Value::from_json(value),
            ValueType::String => Value::Str(text()?),
            ValueType::Text => Value::Text(text()?),
            ValueType::Counter => Value::Counter(int()?),
            ValueType::Timestamp => Value::Timestamp(int()?),
            ValueType::Int => Value::Int(int()?),
            ValueType::Float => Value::Float(value.as_f64().ok_or(wrong("a number"))?),
            ValueType::Bytes => Value::Bytes(
                value
                    .as_str()
                    .and_then(|s| hex::decode(s).ok())
                    .ok_or(wrong("a hex string"))?,
            ),
        })
    }

    fn name(self) -> &'static str {
        match self {
            ValueType::Json => "json",
            ValueType::String => "string",
            ValueType::Text => "text",
            ValueType::Counter => "counter",
            ValueType::Timestamp => "timestamp",
            ValueType::Int => "int",
            ValueType::Float => "float",
            ValueType::Bytes => "bytes",
        }
    }
}

/// Why a [`JsonOp`] is not a valid [`Op`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonOpError {
    /// The path is not a JSON Pointer.
    #[error(transparent)]
    BadPath(#[from] BadPath),
    /// The value does not fit its `type`.
    #[error("a `{}` value needs {needs}", kind.name())]
    WrongValue {
        /// The type asked for.
        kind: ValueType,
        /// What it needs.
        needs: &'static str,
    },
    /// An index or count too large for this machine.
    #[error("{0} is too large for an index")]
    TooLarge(u64),
}

fn index(n: u64) -> Result<usize, JsonOpError> {
    usize::try_from(n).map_err(|_| JsonOpError::TooLarge(n))
}

impl JsonOp {
    /// The op this describes, its path parsed and its value typed.
    pub fn into_op(self) -> Result<Op, JsonOpError> {
        let path = |p: &str| p.parse::<Path>();
        Ok(match self {
            JsonOp::Set {
                path: p,
                value,
                kind,
            } => Op::Set {
                path: path(&p)?,
                value: kind.value(&value)?,
            },
            JsonOp::Delete { path: p } => Op::Delete { path: path(&p)? },
            JsonOp::Increment { path: p, by } => Op::Increment {
                path: path(&p)?,
                by,
            },
            JsonOp::Insert {
                path: p,
                index: i,
                value,
                kind,
            } => Op::Insert {
                path: path(&p)?,
                index: index(i)?,
                value: kind.value(&value)?,
            },
            JsonOp::Remove {
                path: p,
                index: i,
                count,
            } => Op::Remove {
                path: path(&p)?,
                index: index(i)?,
                count: index(count)?,
            },
            JsonOp::Splice {
                path: p,
                index: i,
                delete,
                insert,
            } => Op::Splice {
                path: path(&p)?,
                index: index(i)?,
                delete: index(delete)?,
                insert,
            },
            JsonOp::Merge { path: p, value } => Op::MergeJson {
                path: path(&p)?,
                json: value,
            },
        })
    }
}

impl TryFrom<JsonOp> for Op {
    type Error = JsonOpError;

    fn try_from(op: JsonOp) -> Result<Op, JsonOpError> {
        op.into_op()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(json: Json) -> Result<Op, String> {
        let op: JsonOp = serde_json::from_value(json).map_err(|e| e.to_string())?;
        op.into_op().map_err(|e| e.to_string())
    }

    fn p(s: &str) -> Path {
        s.parse().expect("valid pointer")
    }

    /// Every kind of op reads from its JSON form, optional fields taking
    /// their defaults.
    #[test]
    fn each_op_reads_from_json_with_its_defaults() {
        let cases = [
            (
                json!({"op": "set", "path": "/a", "value": "hi"}),
                Op::Set {
                    path: p("/a"),
                    value: Value::Text("hi".into()),
                },
            ),
            (
                json!({"op": "set", "path": "/a", "value": "hi", "type": "string"}),
                Op::Set {
                    path: p("/a"),
                    value: Value::Str("hi".into()),
                },
            ),
            (
                json!({"op": "set", "path": "/b", "value": "00ff", "type": "bytes"}),
                Op::Set {
                    path: p("/b"),
                    value: Value::Bytes(vec![0, 255]),
                },
            ),
            (
                json!({"op": "delete", "path": "/a"}),
                Op::Delete { path: p("/a") },
            ),
            (
                json!({"op": "increment", "path": "/n"}),
                Op::Increment {
                    path: p("/n"),
                    by: 1,
                },
            ),
            (
                json!({"op": "insert", "path": "/l", "index": 2, "value": 7, "type": "float"}),
                Op::Insert {
                    path: p("/l"),
                    index: 2,
                    value: Value::Float(7.0),
                },
            ),
            (
                json!({"op": "remove", "path": "/l", "index": 0}),
                Op::Remove {
                    path: p("/l"),
                    index: 0,
                    count: 1,
                },
            ),
            (
                json!({"op": "splice", "path": "/t", "index": 3}),
                Op::Splice {
                    path: p("/t"),
                    index: 3,
                    delete: 0,
                    insert: String::new(),
                },
            ),
            (
                json!({"op": "merge", "path": "", "value": {"x": null}}),
                Op::MergeJson {
                    path: p(""),
                    json: json!({"x": null}),
                },
            ),
        ];
        for (json, op) in cases {
            assert_eq!(parse(json.clone()), Ok(op), "{json}");
        }
    }

    /// Bad ops are refused with what is wrong.
    #[test]
    fn bad_ops_say_what_is_wrong() {
        let refused = |json: Json, says: &str| {
            let err = parse(json.clone()).expect_err("refused");
            assert!(err.contains(says), "{json}: {err}");
        };
        refused(json!({"op": "explode", "path": "/a"}), "explode");
        refused(json!({"op": "set", "value": 1}), "path");
        refused(json!({"path": "/a"}), "op");
        refused(json!({"op": "set", "path": "/a"}), "value");
        refused(json!({"op": "set", "path": "a", "value": 1}), "a");
        refused(
            json!({"op": "set", "path": "/a", "value": "x", "type": "counter"}),
            "`counter` value needs an integer",
        );
        refused(
            json!({"op": "set", "path": "/a", "value": 1, "type": "decimal"}),
            "decimal",
        );
        refused(json!({"op": "increment", "path": "/n", "by": 1.5}), "1.5");
        refused(json!({"op": "remove", "path": "/l", "index": -1}), "-1");
    }

    /// What an op writes reads back as the same op.
    #[test]
    fn ops_round_trip_through_json() {
        let op = JsonOp::Splice {
            path: "/t".into(),
            index: 1,
            delete: 2,
            insert: "ab".into(),
        };
        let json = serde_json::to_value(&op).expect("serialize");
        assert_eq!(
            json,
            json!({"op": "splice", "path": "/t", "index": 1, "delete": 2, "insert": "ab"})
        );
        assert_eq!(serde_json::from_value::<JsonOp>(json).expect("parse"), op);
    }
}
