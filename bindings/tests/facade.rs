//! The facade as Rust sees it: errors arrive as the documented variants,
//! a failed transaction changes nothing, and releasing objects from any
//! thread (even inside another async runtime) is safe. The Python and
//! Kotlin suites test the same library through the generated bindings.

use converge_ffi::{ContextOp, ConvergeError, Repo};

fn json(ctx: &converge_ffi::Context, path: &str) -> serde_json::Value {
    serde_json::from_str(&ctx.get_json(path.to_owned()).expect("readable")).expect("json")
}

#[test]
fn bad_input_maps_to_the_documented_errors() {
    let repo = Repo::in_memory().expect("repo");
    let ctx = repo
        .create(Some(r#"{"n": 1, "list": []}"#.to_owned()))
        .expect("create");
    let cases: Vec<(Result<(), ConvergeError>, &str)> = vec![
        (ctx.get_json("no-slash".into()).map(drop), "InvalidInput"),
        (ctx.get_json("/missing".into()).map(drop), "NotFound"),
        (ctx.set_json("/x".into(), "{oops".into()), "InvalidInput"),
        (ctx.increment("/n".into(), 1), "TypeMismatch"),
        (ctx.insert_json("/list".into(), u64::MAX, "1".into()), "any"),
        (ctx.remove("/list".into(), 5, 1), "any"),
        (ctx.splice("/n".into(), 0, 0, "x".into()), "TypeMismatch"),
        (
            ctx.get_json_at("".into(), vec!["zz".into()]).map(drop),
            "InvalidInput",
        ),
        (repo.connect("http://example.com".into()), "InvalidInput"),
    ];
    for (i, (result, want)) in cases.into_iter().enumerate() {
        let err = result.expect_err(&format!("case {i} should fail"));
        let got = match &err {
            ConvergeError::NotFound { .. } => "NotFound",
            ConvergeError::InvalidInput { .. } => "InvalidInput",
            ConvergeError::TypeMismatch { .. } => "TypeMismatch",
            ConvergeError::Storage { .. } => "Storage",
            ConvergeError::Internal { .. } => "Internal",
        };
        assert!(
            want == "any" || got == want,
            "case {i}: {err} is {got}, not {want}"
        );
        assert!(!err.to_string().is_empty(), "case {i} has no message");
    }
    assert_eq!(json(&ctx, ""), serde_json::json!({"n": 1, "list": []}));
}

#[test]
fn a_failed_transaction_changes_nothing() {
    let repo = Repo::in_memory().expect("repo");
    let ctx = repo.create(Some(r#"{"a": 1}"#.to_owned())).expect("create");
    let heads = ctx.heads().expect("heads");
    let err = ctx
        .transact(
            vec![
                ContextOp::Set {
                    path: "/b".into(),
                    json: "2".into(),
                },
                ContextOp::Increment {
                    path: "/a".into(),
                    by: 1,
                },
            ],
            Some("half".into()),
        )
        .expect_err("incrementing a plain number fails");
    assert!(matches!(err, ConvergeError::TypeMismatch { .. }), "{err}");
    assert_eq!(ctx.heads().expect("heads"), heads);
    assert_eq!(json(&ctx, ""), serde_json::json!({"a": 1}));

    let hash = ctx
        .transact(
            vec![
                ContextOp::SetCounter {
                    path: "/c".into(),
                    value: 5,
                },
                ContextOp::Increment {
                    path: "/c".into(),
                    by: -2,
                },
            ],
            Some("both".into()),
        )
        .expect("valid transaction")
        .expect("it changed something");
    let newest = &ctx.history(0, 1).expect("history")[0];
    assert_eq!(
        (newest.hash.as_str(), newest.message.as_deref()),
        (hash.as_str(), Some("both"))
    );
    assert_eq!(json(&ctx, "/c"), serde_json::json!(3));
}

#[test]
fn objects_can_be_released_inside_another_async_runtime() {
    // Foreign code may drop the last reference on a thread that is running
    // its own tokio runtime; dropping ours there must not panic.
    let outer = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let repo = Repo::in_memory().expect("repo");
    let ctx = repo.create(None).expect("create");
    outer.block_on(async move {
        drop(ctx);
        drop(repo);
    });
}

/// Every input the `bindings` fuzz target once crashed on (committed under
/// fuzz/regressions/bindings/) runs clean, as does a script using every
/// op once.
#[test]
fn committed_fuzz_inputs_run_clean() {
    let repo = Repo::in_memory().expect("repo");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/bindings");
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .map(|path| std::fs::read(path).expect("read input"))
        .collect();
    let every_op: Vec<u8> = (0u8..16)
        .flat_map(|op| {
            let mut step = vec![op];
            step.extend_from_slice(b"/a\x01{\"a\": [1, \"two\"]}");
            step.push(0xff);
            step
        })
        .collect();
    inputs.push(every_op);
    for input in &inputs {
        converge_ffi::fuzz::run(&repo, input);
    }
}
