#![no_main]
//! `converge_ffi::fuzz::run` (see that module): the bindings' entry points,
//! on an in-memory repo replaced every few thousand inputs so its memory
//! stays bounded.

use std::sync::{Arc, Mutex};

use converge_ffi::Repo;

/// Inputs one repo serves before a fresh one replaces it.
const RUNS_PER_REPO: u32 = 2_000;

static REPO: Mutex<Option<(Arc<Repo>, u32)>> = Mutex::new(None);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    converge_proto::fuzz::contain_panics();
    let repo = {
        let mut slot = REPO.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some((repo, runs)) if *runs < RUNS_PER_REPO => {
                *runs += 1;
                repo.clone()
            }
            _ => {
                let repo = Repo::in_memory().expect("an in-memory repo");
                *slot = Some((repo.clone(), 1));
                repo
            }
        }
    };
    converge_ffi::fuzz::run(&repo, data);
});
