//! Reading a context's past: its history, the patches between two
//! versions, and read-only copies of old versions.

use automerge::{Automerge, ChangeHash, ObjId, Patch, PatchAction, Prop};
use serde_json::Value as Json;

use super::{check_heads, read_object, scalar_value, ContextError, Path, Segment};

/// One change in a context's history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChangeInfo {
    /// The change hash (hex).
    pub hash: String,
    /// Who made it (actor id, hex).
    pub actor: String,
    /// Its sequence number for that actor.
    pub seq: u64,
    /// When, in seconds since the epoch, as the author's clock said.
    pub time: i64,
    /// The author's message, if any.
    pub message: Option<String>,
    /// The changes it builds on (hex).
    pub deps: Vec<String>,
}

/// The history, newest first: `limit` changes after skipping `offset`.
pub fn history(doc: &Automerge, offset: usize, limit: usize) -> Vec<ChangeInfo> {
    let all = doc.get_changes_meta(&[]);
    all.iter()
        .rev()
        .skip(offset)
        .take(limit)
        .map(|c| ChangeInfo {
            hash: c.hash.to_string(),
            actor: c.actor.to_hex_string(),
            seq: c.seq,
            time: c.timestamp,
            message: c.message.as_ref().map(|m| m.to_string()),
            deps: c.deps.iter().map(|d| d.to_string()).collect(),
        })
        .collect()
}

/// How many changes the history holds.
pub fn change_count(doc: &Automerge) -> usize {
    doc.get_changes_meta(&[]).len()
}

/// What happened at a path, in JSON terms.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum PatchKind {
    /// A value was set.
    Put {
        /// The new value.
        value: Json,
    },
    /// A map key or list elements were removed.
    Delete {
        /// How many elements (1 for a map key).
        count: usize,
    },
    /// List elements were inserted.
    Insert {
        /// The new elements.
        values: Vec<Json>,
    },
    /// Text was inserted.
    SpliceText {
        /// The inserted text.
        text: String,
    },
    /// A counter changed.
    Increment {
        /// By how much.
        by: i64,
    },
}

/// One change to a context, as seen by a subscriber.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ContextPatch {
    /// Where (a JSON Pointer; for list and text changes, the position).
    pub path: String,
    /// What.
    #[serde(flatten)]
    pub kind: PatchKind,
}

/// The patches that turn the document at `before` into the document at
/// `after`, limited to those at or below `prefix`.
pub fn diff(
    doc: &Automerge,
    before: &[ChangeHash],
    after: &[ChangeHash],
    prefix: &Path,
) -> Result<Vec<ContextPatch>, ContextError> {
    check_heads(doc, before)?;
    check_heads(doc, after)?;
    // A new object arrives as a put followed by the patches that fill
    // it; the put already carries its whole value, so those are dropped.
    let mut filled: Vec<Path> = Vec::new();
    let mut out = Vec::new();
    for (path, kind) in doc
        .diff(before, after)
        .into_iter()
        .filter_map(|p| convert_patch(doc, p))
    {
        if filled.iter().any(|f| path.starts_with(f) && path != *f) {
            continue;
        }
        if matches!(&kind, PatchKind::Put { value } if value.is_object() || value.is_array() || value.is_string())
        {
            filled.push(path.clone());
        }
        if path.overlaps(prefix) {
            out.push(ContextPatch {
                path: path.to_string(),
                kind,
            });
        }
    }
    Ok(out)
}

fn prop_segment(prop: &Prop) -> Segment {
    match prop {
        Prop::Map(k) => Segment::Key(k.clone()),
        Prop::Seq(i) => Segment::Key(i.to_string()),
    }
}

fn patch_value(doc: &Automerge, value: &automerge::Value<'_>, id: &ObjId) -> Json {
    match value {
        automerge::Value::Object(t) => read_object(doc, id, *t, None).to_json(),
        automerge::Value::Scalar(s) => scalar_value(s).to_json(),
    }
}

fn convert_patch(doc: &Automerge, patch: Patch) -> Option<(Path, PatchKind)> {
    let base = Path(patch.path.iter().map(|(_, p)| prop_segment(p)).collect());
    let at = |seg: Segment| base.child(seg);
    Some(match patch.action {
        PatchAction::PutMap { key, value, .. } => (
            at(Segment::Key(key)),
            PatchKind::Put {
                value: patch_value(doc, &value.0, &value.1),
            },
        ),
        PatchAction::PutSeq { index, value, .. } => (
            at(Segment::Key(index.to_string())),
            PatchKind::Put {
                value: patch_value(doc, &value.0, &value.1),
            },
        ),
        PatchAction::Insert { index, values } => (
            at(Segment::Key(index.to_string())),
            PatchKind::Insert {
                values: values
                    .iter()
                    .map(|(v, id, _)| patch_value(doc, v, id))
                    .collect(),
            },
        ),
        PatchAction::SpliceText { index, value, .. } => (
            at(Segment::Key(index.to_string())),
            PatchKind::SpliceText {
                text: value.make_string(),
            },
        ),
        PatchAction::Increment { prop, value } => {
            (at(prop_segment(&prop)), PatchKind::Increment { by: value })
        }
        PatchAction::DeleteMap { key } => (at(Segment::Key(key)), PatchKind::Delete { count: 1 }),
        PatchAction::DeleteSeq { index, length } => (
            at(Segment::Key(index.to_string())),
            PatchKind::Delete { count: length },
        ),
        PatchAction::Conflict { .. } | PatchAction::Mark { .. } => return None,
    })
}

/// A read-only copy of the document as it was at `heads`.
pub fn view_at(doc: &Automerge, heads: &[ChangeHash]) -> Result<Automerge, ContextError> {
    check_heads(doc, heads)?;
    Ok(doc.fork_at(heads)?)
}
