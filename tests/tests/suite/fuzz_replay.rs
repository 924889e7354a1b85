//! Every input a fuzz target once crashed on (committed under
//! `fuzz/regressions/<target>/`) is replayed through the same entry point
//! on stable, in every `cargo test`: a crash found once stays fixed.

use converge_core::proto_fuzz as fuzz;

#[test]
fn committed_fuzz_inputs_run_clean() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    for target in fuzz::TARGETS {
        let dir = root.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("entry").path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let data = std::fs::read(&path).expect("read input");
            fuzz::run(target, &data);
            if target == "claims" {
                jwt(&data);
            }
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} committed fuzz inputs");
}

/// The JWT half of the `claims` target (fuzz/fuzz_targets/claims.rs).
fn jwt(data: &[u8]) {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let _ = jsonwebtoken::decode_header(token);
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    let key = DecodingKey::from_secret(b"fuzzing secret, 32 bytes or more!");
    if let Ok(data) =
        jsonwebtoken::decode::<converge_core::engine::Claims>(token, &key, &validation)
    {
        let _ = data.claims.grant();
    }
}
