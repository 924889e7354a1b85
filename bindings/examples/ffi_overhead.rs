//! The Rust side of QUALITY.md's P8: the same facade calls the Python
//! benchmark (`python/bench_ffi.py`) makes, made from Rust, timed per call.
//!
//! `cargo run --release -p converge-ffi --example ffi_overhead [calls]`
//! prints one JSON line: `{"splice_us": .., "set_us": ..}`.

use std::time::Instant;

use converge_ffi::{ConvergeError, Repo};

fn main() -> Result<(), ConvergeError> {
    let calls: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let repo = Repo::in_memory()?;
    let ctx = repo.create(Some(r#"{"text": "", "n": 0}"#.to_owned()))?;

    // Warm up allocation paths before timing.
    for i in 0..1_000 {
        ctx.splice("/text".to_owned(), i, 0, "w".to_owned())?;
    }
    let start = Instant::now();
    for i in 0..calls {
        ctx.splice("/text".to_owned(), 1_000 + i, 0, "a".to_owned())?;
    }
    let splice_us = start.elapsed().as_secs_f64() * 1e6 / calls as f64;

    let start = Instant::now();
    for i in 0..calls {
        ctx.set_json("/n".to_owned(), i.to_string())?;
    }
    let set_us = start.elapsed().as_secs_f64() * 1e6 / calls as f64;

    // A call that never leaves the facade: the bare cost of crossing.
    let start = Instant::now();
    let mut total = 0;
    for _ in 0..calls {
        total += std::hint::black_box(ctx.url()).len();
    }
    let url_us = start.elapsed().as_secs_f64() * 1e6 / calls as f64;
    assert!(total > 0);

    println!(
        "{{\"splice_us\": {splice_us:.3}, \"set_us\": {set_us:.3}, \"url_us\": {url_us:.3}, \"calls\": {calls}}}"
    );
    Ok(())
}
