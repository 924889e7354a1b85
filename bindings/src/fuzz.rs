//! The bindings' entry points driven by arbitrary bytes: the cargo-fuzz
//! target `bindings` (fuzz/fuzz_targets/bindings.rs) calls [`run`], and the
//! inputs it once crashed on (fuzz/regressions/bindings/) are replayed by
//! this crate's tests. Everything a foreign caller can hand over — paths,
//! JSON, text, URLs, heads, indices, counts — comes from the input; a call
//! may fail, none may panic.
//!
//! The input is a script: steps separated by `0xff`, each an op byte and
//! its argument bytes (read as text, two arguments split at `0x01`;
//! numbers from the argument bytes).

use std::sync::Arc;

use crate::{Context, ContextOp, Repo};

/// Most steps run from one input (keeps every run short).
const MAX_STEPS: usize = 64;

/// Runs the script in `data` against a new context of `repo`.
pub fn run(repo: &Arc<Repo>, data: &[u8]) {
    let Ok(ctx) = repo.create(None) else {
        return;
    };
    for step in data.split(|b| *b == 0xff).take(MAX_STEPS) {
        let Some((&op, args)) = step.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(args);
        let (a, b) = text.split_once('\u{1}').unwrap_or((&text, ""));
        let (a, b) = (a.to_owned(), b.to_owned());
        let small = |i: usize| u64::from(args.get(i).copied().unwrap_or(0) % 16);
        let wide = || {
            let mut bytes = [0u8; 8];
            for (to, from) in bytes.iter_mut().zip(args) {
                *to = *from;
            }
            u64::from_le_bytes(bytes)
        };
        match op % 16 {
            0 => drop(ctx.set_json(a, b)),
            1 => drop(ctx.get_json(a)),
            2 => drop(ctx.merge_json(a, b)),
            3 => drop(ctx.insert_json(a, small(0), b)),
            4 => drop(ctx.splice(a, small(0), small(1), b)),
            5 => drop(ctx.delete(a)),
            6 => drop(ctx.increment(a, wide() as i64)),
            7 => drop(ctx.set_counter(a, wide() as i64)),
            8 => drop(ctx.remove(a, small(0), small(1))),
            9 => drop(ctx.get_json_at(a, b.split(',').map(str::to_owned).collect())),
            10 => drop(ctx.history(wide(), wide().rotate_left(32))),
            11 => drop(repo.create(Some(a))),
            12 => drop(repo.rt.block_on(repo.find(a))),
            13 => drop(ctx.transact(ops(&a, &b, args), Some(b.clone()))),
            14 => drop(ctx.heads()),
            _ => drop(same_context(repo, &ctx)),
        }
    }
}

/// A transaction of every kind of op on the two arguments.
fn ops(a: &str, b: &str, args: &[u8]) -> Vec<ContextOp> {
    let n = |i: usize| u64::from(args.get(i).copied().unwrap_or(0) % 8);
    vec![
        ContextOp::Set {
            path: a.to_owned(),
            json: b.to_owned(),
        },
        ContextOp::MergeJson {
            path: a.to_owned(),
            json: b.to_owned(),
        },
        ContextOp::Insert {
            path: a.to_owned(),
            index: n(0),
            json: b.to_owned(),
        },
        ContextOp::Splice {
            path: a.to_owned(),
            index: n(1),
            delete: n(2),
            insert: b.to_owned(),
        },
        ContextOp::Increment {
            path: b.to_owned(),
            by: n(3) as i64,
        },
        ContextOp::Remove {
            path: a.to_owned(),
            index: n(4),
            count: n(5),
        },
        ContextOp::Delete { path: b.to_owned() },
    ]
}

/// Finds the context again by its URL: the same content.
fn same_context(repo: &Arc<Repo>, ctx: &Context) -> Result<(), crate::ConvergeError> {
    let found = repo.rt.block_on(repo.find(ctx.url()))?;
    assert_eq!(
        found.get_json(String::new())?,
        ctx.get_json(String::new())?,
        "a context found by its URL holds what was written"
    );
    Ok(())
}
