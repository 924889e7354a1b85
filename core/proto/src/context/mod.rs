//! The Context API: a small, typed view of one Automerge document.
//!
//! Everything here is plain functions over `automerge::Automerge`, so the
//! same code serves the runtime's `Context` handle, the relay's HTTP API and
//! tests. Paths are JSON Pointers ([`Path`]); values are [`Value`]s;
//! several [`Op`]s applied together become one Automerge change
//! ([`apply`]). Reads can be made at any past version (`heads`), history is
//! listed newest first ([`history`]), and changes between versions come out
//! as [`ContextPatch`]es ([`diff`]).
//!
//! The relay's HTTP API and the bindings take edits as [`JsonOp`]s, a
//! serde-tagged JSON form of [`Op`] (`{"op": "set", "path": ..., ...}`).
//!
//! Layout: this file holds values, errors, ops and the reads and writes at
//! a path; `path.rs` the JSON Pointers; `json_op.rs` the JSON form of ops;
//! `diff.rs` history, patches between versions and past versions.
//!
//! Strings: [`Value::Text`] is a collaborative text object (what
//! automerge-repo's JavaScript makes of a string); [`Value::Str`] is an
//! immutable scalar string. JSON strings (in [`Op::MergeJson`] and
//! [`Value::from_json`]) become text, to match the JavaScript side.

mod diff;
mod json_op;
mod path;

use std::collections::BTreeMap;

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{Automerge, ChangeHash, ObjId, ObjType, Prop, ReadDoc, ScalarValue, ROOT};
use serde_json::{json, Map as JsonMap, Value as Json};

pub use diff::{change_count, diff, history, view_at, ChangeInfo, ContextPatch, PatchKind};
pub use json_op::{JsonOp, JsonOpError, ValueType};
pub use path::{BadPath, Path, Segment};

/// A value in a context.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// JSON null.
    Null,
    /// true or false.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// An immutable string.
    Str(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    /// A counter: concurrent increments add up.
    Counter(i64),
    /// Collaborative text.
    Text(String),
    /// A list.
    List(Vec<Value>),
    /// A map with string keys.
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// A JSON value as a context value: strings become text, integers
    /// `Int`, other numbers `Float`, arrays lists and objects maps.
    pub fn from_json(json: &Json) -> Value {
        match json {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => Value::Text(s.clone()),
            Json::Array(items) => Value::List(items.iter().map(Value::from_json).collect()),
            Json::Object(m) => Value::Map(
                m.iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v)))
                    .collect(),
            ),
        }
    }

    /// The value as JSON: text and strings as strings, counters and
    /// timestamps as numbers, bytes as `{"$bytes": "<hex>"}`.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Bool(b) => json!(b),
            Value::Int(i) | Value::Counter(i) | Value::Timestamp(i) => json!(i),
            Value::Float(f) => json!(f),
            Value::Str(s) | Value::Text(s) => json!(s),
            Value::Bytes(b) => json!({ "$bytes": hex::encode(b) }),
            Value::List(items) => Json::Array(items.iter().map(Value::to_json).collect()),
            Value::Map(m) => {
                Json::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::Timestamp(_) => "timestamp",
            Value::Counter(_) => "counter",
            Value::Text(_) => "text",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }
}

/// Why a context operation failed. The document is untouched when any op
/// of a transaction fails.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// The path is not a JSON Pointer.
    #[error(transparent)]
    BadPath(#[from] BadPath),
    /// Nothing is at this path (or at one of its parents).
    #[error("nothing at {0}")]
    NotFound(String),
    /// Something of another type is there.
    #[error("{path} is a {found}, not a {expected}")]
    TypeMismatch {
        /// Where.
        path: String,
        /// What the operation needs.
        expected: &'static str,
        /// What is there.
        found: &'static str,
    },
    /// A list or text position past the end.
    #[error("index {index} is out of range at {path} (length {len})")]
    IndexOutOfRange {
        /// The list or text.
        path: String,
        /// The position asked for.
        index: usize,
        /// How long it is.
        len: usize,
    },
    /// The root cannot be set, deleted or replaced.
    #[error("the document root cannot be {0}; address a key below it")]
    Root(&'static str),
    /// Heads that this document does not have.
    #[error("unknown heads: {0}")]
    UnknownHeads(String),
    /// Automerge refused the operation.
    #[error("automerge: {0}")]
    Automerge(String),
}

impl From<automerge::AutomergeError> for ContextError {
    fn from(e: automerge::AutomergeError) -> Self {
        ContextError::Automerge(e.to_string())
    }
}

/// One edit.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Put a value at a map key or list index (replacing what is there);
    /// `/-` on a list appends.
    Set {
        /// Where.
        path: Path,
        /// What.
        value: Value,
    },
    /// Remove a map key or list element.
    Delete {
        /// Where.
        path: Path,
    },
    /// Add to a counter.
    Increment {
        /// The counter.
        path: Path,
        /// By how much (may be negative).
        by: i64,
    },
    /// Insert into a list at `index` (the list's length appends).
    Insert {
        /// The list.
        path: Path,
        /// Before which element.
        index: usize,
        /// What.
        value: Value,
    },
    /// Remove `count` elements of a list from `index`.
    Remove {
        /// The list.
        path: Path,
        /// From where.
        index: usize,
        /// How many.
        count: usize,
    },
    /// Replace `delete` characters of a text at `index` with `insert`.
    Splice {
        /// The text.
        path: Path,
        /// Where, in characters.
        index: usize,
        /// How many to delete.
        delete: usize,
        /// What to insert.
        insert: String,
    },
    /// Merge a JSON object into the map at `path`: keys are set (objects
    /// merged recursively), `null` deletes a key.
    MergeJson {
        /// The map.
        path: Path,
        /// What to merge.
        json: Json,
    },
}

/// What is at a path.
enum Slot {
    /// The document root.
    Root,
    /// A key of a map object.
    MapKey(ObjId, String),
    /// A position of a list or text object (`len` = its length).
    Seq(ObjId, ObjType, usize, usize),
}

fn obj_kind(t: ObjType) -> &'static str {
    match t {
        ObjType::Map | ObjType::Table => "map",
        ObjType::List => "list",
        ObjType::Text => "text",
    }
}

/// Resolves the object at `path` (which must exist and be an object).
fn object_at<R: ReadDoc>(
    doc: &R,
    path: &Path,
    heads: Option<&[ChangeHash]>,
) -> Result<(ObjId, ObjType), ContextError> {
    let mut obj = ROOT;
    let mut kind = ObjType::Map;
    for (i, seg) in path.0.iter().enumerate() {
        let here = Path(path.0[..=i].to_vec()).to_string();
        let prop = prop_for(kind, seg, &here, length(doc, &obj, heads))?;
        let got = match heads {
            Some(h) => doc.get_at(&obj, prop, h)?,
            None => doc.get(&obj, prop)?,
        };
        match got {
            Some((automerge::Value::Object(t), id)) => {
                obj = id;
                kind = t;
            }
            Some((automerge::Value::Scalar(s), _)) => {
                return Err(ContextError::TypeMismatch {
                    path: here,
                    expected: "map, list or text",
                    found: scalar_kind(&s),
                })
            }
            None => return Err(ContextError::NotFound(here)),
        }
    }
    Ok((obj, kind))
}

fn length<R: ReadDoc>(doc: &R, obj: &ObjId, heads: Option<&[ChangeHash]>) -> usize {
    match heads {
        Some(h) => doc.length_at(obj, h),
        None => doc.length(obj),
    }
}

fn prop_for(kind: ObjType, seg: &Segment, here: &str, len: usize) -> Result<Prop, ContextError> {
    match kind {
        ObjType::Map | ObjType::Table => match seg {
            Segment::Key(k) => Ok(Prop::Map(k.clone())),
            Segment::End => Err(ContextError::TypeMismatch {
                path: here.to_owned(),
                expected: "list",
                found: "map",
            }),
        },
        ObjType::List | ObjType::Text => {
            let index = match seg {
                Segment::End => len,
                other => other.index().ok_or_else(|| ContextError::TypeMismatch {
                    path: here.to_owned(),
                    expected: "map",
                    found: obj_kind(kind),
                })?,
            };
            if index >= len {
                return Err(ContextError::IndexOutOfRange {
                    path: here.to_owned(),
                    index,
                    len,
                });
            }
            Ok(Prop::Seq(index))
        }
    }
}

fn scalar_kind(s: &ScalarValue) -> &'static str {
    match s {
        ScalarValue::Bytes(_) => "bytes",
        ScalarValue::Str(_) => "string",
        ScalarValue::Int(_) | ScalarValue::Uint(_) => "integer",
        ScalarValue::F64(_) => "float",
        ScalarValue::Counter(_) => "counter",
        ScalarValue::Timestamp(_) => "timestamp",
        ScalarValue::Boolean(_) => "bool",
        ScalarValue::Null => "null",
        ScalarValue::Unknown { .. } => "unknown value",
    }
}

/// Resolves where `path` points: its parent must exist.
fn slot<R: ReadDoc>(doc: &R, path: &Path) -> Result<Slot, ContextError> {
    let Some((parent, last)) = path.split_last() else {
        return Ok(Slot::Root);
    };
    let (obj, kind) = object_at(doc, &parent, None)?;
    match kind {
        ObjType::Map | ObjType::Table => match last {
            Segment::Key(k) => Ok(Slot::MapKey(obj, k.clone())),
            Segment::End => Err(ContextError::TypeMismatch {
                path: parent.to_string(),
                expected: "list",
                found: "map",
            }),
        },
        ObjType::List | ObjType::Text => {
            let len = doc.length(&obj);
            let index = match last {
                Segment::End => len,
                other => other.index().ok_or_else(|| ContextError::TypeMismatch {
                    path: parent.to_string(),
                    expected: "map",
                    found: obj_kind(kind),
                })?,
            };
            Ok(Slot::Seq(obj, kind, index, len))
        }
    }
}

/// Reads the value at `path` (at `heads`, or now).
pub fn get(
    doc: &Automerge,
    path: &Path,
    heads: Option<&[ChangeHash]>,
) -> Result<Value, ContextError> {
    if let Some(h) = heads {
        check_heads(doc, h)?;
    }
    let Some((parent, last)) = path.split_last() else {
        return Ok(read_object(doc, &ROOT, ObjType::Map, heads));
    };
    let (obj, kind) = object_at(doc, &parent, heads)?;
    let here = path.to_string();
    let prop = prop_for(kind, last, &here, length(doc, &obj, heads))?;
    if kind == ObjType::Text {
        // A character of a text.
        let text = read_text(doc, &obj, heads);
        let Prop::Seq(i) = prop else {
            unreachable_text()
        };
        return Ok(Value::Str(
            text.chars().nth(i).map(String::from).unwrap_or_default(),
        ));
    }
    let got = match heads {
        Some(h) => doc.get_at(&obj, prop, h)?,
        None => doc.get(&obj, prop)?,
    };
    match got {
        Some((automerge::Value::Object(t), id)) => Ok(read_object(doc, &id, t, heads)),
        Some((automerge::Value::Scalar(s), _)) => Ok(scalar_value(&s)),
        None => Err(ContextError::NotFound(here)),
    }
}

fn unreachable_text() -> ! {
    unreachable!("prop_for returns a sequence position for text")
}

fn check_heads(doc: &Automerge, heads: &[ChangeHash]) -> Result<(), ContextError> {
    match heads
        .iter()
        .find(|h| doc.get_change_meta_by_hash(h).is_none())
    {
        Some(h) => Err(ContextError::UnknownHeads(h.to_string())),
        None => Ok(()),
    }
}

fn scalar_value(s: &ScalarValue) -> Value {
    match s {
        ScalarValue::Bytes(b) => Value::Bytes(b.clone()),
        ScalarValue::Str(s) => Value::Str(s.to_string()),
        ScalarValue::Int(i) => Value::Int(*i),
        ScalarValue::Uint(u) => i64::try_from(*u)
            .map(Value::Int)
            .unwrap_or(Value::Float(*u as f64)),
        ScalarValue::F64(f) => Value::Float(*f),
        ScalarValue::Counter(c) => Value::Counter(i64::from(c)),
        ScalarValue::Timestamp(t) => Value::Timestamp(*t),
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Value::Null,
    }
}

fn read_text<R: ReadDoc>(doc: &R, obj: &ObjId, heads: Option<&[ChangeHash]>) -> String {
    match heads {
        Some(h) => doc.text_at(obj, h).unwrap_or_default(),
        None => doc.text(obj).unwrap_or_default(),
    }
}

fn read_object<R: ReadDoc>(
    doc: &R,
    obj: &ObjId,
    kind: ObjType,
    heads: Option<&[ChangeHash]>,
) -> Value {
    let child = |value: automerge::Value<'_>, id: ObjId| match value {
        automerge::Value::Object(t) => read_object(doc, &id, t, heads),
        automerge::Value::Scalar(s) => scalar_value(&s),
    };
    match kind {
        ObjType::Text => Value::Text(read_text(doc, obj, heads)),
        ObjType::List => {
            let items = match heads {
                Some(h) => doc
                    .list_range_at(obj, .., h)
                    .map(|i| {
                        let id = i.id();
                        child(i.value.into(), id)
                    })
                    .collect(),
                None => doc
                    .list_range(obj, ..)
                    .map(|i| {
                        let id = i.id();
                        child(i.value.into(), id)
                    })
                    .collect(),
            };
            Value::List(items)
        }
        ObjType::Map | ObjType::Table => {
            let entries = match heads {
                Some(h) => doc
                    .map_range_at(obj, .., h)
                    .map(|i| {
                        let id = i.id();
                        (i.key.to_string(), child(i.value.into(), id))
                    })
                    .collect(),
                None => doc
                    .map_range(obj, ..)
                    .map(|i| {
                        let id = i.id();
                        (i.key.to_string(), child(i.value.into(), id))
                    })
                    .collect(),
            };
            Value::Map(entries)
        }
    }
}

/// The subtree at `path` as JSON (at `heads`, or now).
pub fn to_json(
    doc: &Automerge,
    path: &Path,
    heads: Option<&[ChangeHash]>,
) -> Result<Json, ContextError> {
    get(doc, path, heads).map(|v| v.to_json())
}

/// Applies `ops` as one change with an optional message and time (seconds
/// since the epoch). Either every op applies or none does. Returns the new
/// change's hash, or `None` if the ops changed nothing.
pub fn apply(
    doc: &mut Automerge,
    ops: &[Op],
    message: Option<String>,
    time: Option<i64>,
) -> Result<Option<ChangeHash>, ContextError> {
    let mut opts = CommitOptions::default();
    if let Some(m) = message {
        opts = opts.with_message(m);
    }
    if let Some(t) = time {
        opts = opts.with_time(t);
    }
    let mut tx = doc.transaction();
    for op in ops {
        if let Err(e) = apply_op(&mut tx, op) {
            tx.rollback();
            return Err(e);
        }
    }
    Ok(tx.commit_with(opts).0)
}

fn apply_op(tx: &mut Transaction<'_>, op: &Op) -> Result<(), ContextError> {
    match op {
        Op::Set { path, value } => match slot(tx, path)? {
            Slot::Root => match value {
                Value::Map(m) => {
                    for (k, v) in m {
                        put_in_map(tx, &ROOT, k, v)?;
                    }
                    Ok(())
                }
                _ => Err(ContextError::Root("replaced by a non-map")),
            },
            Slot::MapKey(obj, key) => put_in_map(tx, &obj, &key, value),
            Slot::Seq(_, ObjType::Text, ..) => Err(ContextError::TypeMismatch {
                path: path.to_string(),
                expected: "list element (use splice for text)",
                found: obj_kind(ObjType::Text),
            }),
            Slot::Seq(obj, _, index, len) => {
                if index < len {
                    put_in_list(tx, &obj, index, value, false)
                } else if index == len {
                    put_in_list(tx, &obj, index, value, true)
                } else {
                    Err(ContextError::IndexOutOfRange {
                        path: path.to_string(),
                        index,
                        len,
                    })
                }
            }
        },
        Op::Delete { path } => match slot(tx, path)? {
            Slot::Root => Err(ContextError::Root("deleted")),
            Slot::MapKey(obj, key) => {
                if tx.get(&obj, key.as_str())?.is_none() {
                    return Err(ContextError::NotFound(path.to_string()));
                }
                Ok(tx.delete(&obj, key.as_str())?)
            }
            Slot::Seq(obj, kind, index, len) => {
                if index >= len {
                    return Err(ContextError::IndexOutOfRange {
                        path: path.to_string(),
                        index,
                        len,
                    });
                }
                if kind == ObjType::Text {
                    Ok(tx.splice_text(&obj, index, 1, "")?)
                } else {
                    Ok(tx.delete(&obj, index)?)
                }
            }
        },
        Op::Increment { path, by } => {
            let current = get_current(tx, path)?;
            if !matches!(current, Value::Counter(_)) {
                return Err(ContextError::TypeMismatch {
                    path: path.to_string(),
                    expected: "counter",
                    found: current.kind(),
                });
            }
            match slot(tx, path)? {
                Slot::MapKey(obj, key) => Ok(tx.increment(&obj, key.as_str(), *by)?),
                Slot::Seq(obj, _, index, _) => Ok(tx.increment(&obj, index, *by)?),
                Slot::Root => Err(ContextError::Root("incremented")),
            }
        }
        Op::Insert { path, index, value } => {
            let obj = sequence_at(tx, path, ObjType::List, *index)?;
            put_in_list(tx, &obj, *index, value, true)
        }
        Op::Remove { path, index, count } => {
            let obj = sequence_at(tx, path, ObjType::List, index.saturating_add(*count))?;
            let count = isize::try_from(*count).unwrap_or(isize::MAX);
            Ok(tx.splice(&obj, *index, count, std::iter::empty::<ScalarValue>())?)
        }
        Op::Splice {
            path,
            index,
            delete,
            insert,
        } => {
            let obj = sequence_at(tx, path, ObjType::Text, index.saturating_add(*delete))?;
            let delete = isize::try_from(*delete).unwrap_or(isize::MAX);
            Ok(tx.splice_text(&obj, *index, delete, insert)?)
        }
        Op::MergeJson { path, json } => {
            let Json::Object(fields) = json else {
                return Err(ContextError::TypeMismatch {
                    path: path.to_string(),
                    expected: "JSON object to merge",
                    found: "non-object JSON",
                });
            };
            let (obj, kind) = object_at(tx, path, None)?;
            if !matches!(kind, ObjType::Map | ObjType::Table) {
                return Err(ContextError::TypeMismatch {
                    path: path.to_string(),
                    expected: "map",
                    found: obj_kind(kind),
                });
            }
            merge_into(tx, &obj, fields)
        }
    }
}

/// The object at `path`, which must be of `kind`, with its length; `end`
/// (a position past the last touched element) must not pass the length.
fn sequence_at(
    tx: &Transaction<'_>,
    path: &Path,
    kind: ObjType,
    end: usize,
) -> Result<ObjId, ContextError> {
    let (obj, found) = object_at(tx, path, None)?;
    if found != kind {
        return Err(ContextError::TypeMismatch {
            path: path.to_string(),
            expected: obj_kind(kind),
            found: obj_kind(found),
        });
    }
    let len = tx.length(&obj);
    if end > len {
        return Err(ContextError::IndexOutOfRange {
            path: path.to_string(),
            index: end,
            len,
        });
    }
    Ok(obj)
}

fn get_current(tx: &Transaction<'_>, path: &Path) -> Result<Value, ContextError> {
    let Some((parent, last)) = path.split_last() else {
        return Ok(Value::Map(BTreeMap::new()));
    };
    let (obj, kind) = object_at(tx, &parent, None)?;
    let here = path.to_string();
    let prop = prop_for(kind, last, &here, tx.length(&obj))?;
    match tx.get(&obj, prop)? {
        Some((automerge::Value::Scalar(s), _)) => Ok(scalar_value(&s)),
        Some((automerge::Value::Object(t), _)) => Ok(match t {
            ObjType::Text => Value::Text(String::new()),
            ObjType::List => Value::List(Vec::new()),
            _ => Value::Map(BTreeMap::new()),
        }),
        None => Err(ContextError::NotFound(here)),
    }
}

fn merge_into(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    fields: &JsonMap<String, Json>,
) -> Result<(), ContextError> {
    for (key, value) in fields {
        match value {
            Json::Null => {
                if tx.get(obj, key.as_str())?.is_some() {
                    tx.delete(obj, key.as_str())?;
                }
            }
            Json::Object(inner) => match tx.get(obj, key.as_str())? {
                Some((automerge::Value::Object(ObjType::Map), child)) => {
                    merge_into(tx, &child, inner)?
                }
                _ => put_in_map(tx, obj, key, &Value::from_json(value))?,
            },
            other => put_in_map(tx, obj, key, &Value::from_json(other))?,
        }
    }
    Ok(())
}

fn scalar(value: &Value) -> Option<ScalarValue> {
    Some(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::Int(i) => ScalarValue::Int(*i),
        Value::Float(f) => ScalarValue::F64(*f),
        Value::Str(s) => ScalarValue::Str(s.as_str().into()),
        Value::Bytes(b) => ScalarValue::Bytes(b.clone()),
        Value::Timestamp(t) => ScalarValue::Timestamp(*t),
        Value::Counter(c) => ScalarValue::counter(*c),
        Value::Text(_) | Value::List(_) | Value::Map(_) => return None,
    })
}

fn object_type(value: &Value) -> ObjType {
    match value {
        Value::Text(_) => ObjType::Text,
        Value::List(_) => ObjType::List,
        _ => ObjType::Map,
    }
}

fn fill(tx: &mut Transaction<'_>, obj: &ObjId, value: &Value) -> Result<(), ContextError> {
    match value {
        Value::Text(s) => tx.splice_text(obj, 0, 0, s)?,
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                put_in_list(tx, obj, i, item, true)?;
            }
        }
        Value::Map(m) => {
            for (k, v) in m {
                put_in_map(tx, obj, k, v)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn put_in_map(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    value: &Value,
) -> Result<(), ContextError> {
    match scalar(value) {
        Some(s) => tx.put(obj, key, s)?,
        None => {
            let child = tx.put_object(obj, key, object_type(value))?;
            fill(tx, &child, value)?;
        }
    }
    Ok(())
}

fn put_in_list(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    index: usize,
    value: &Value,
    insert: bool,
) -> Result<(), ContextError> {
    match (scalar(value), insert) {
        (Some(s), true) => tx.insert(obj, index, s)?,
        (Some(s), false) => tx.put(obj, index, s)?,
        (None, true) => {
            let child = tx.insert_object(obj, index, object_type(value))?;
            fill(tx, &child, value)?;
        }
        (None, false) => {
            let child = tx.put_object(obj, index, object_type(value))?;
            fill(tx, &child, value)?;
        }
    }
    Ok(())
}
