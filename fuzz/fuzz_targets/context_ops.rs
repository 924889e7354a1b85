#![no_main]
//! `converge_proto::fuzz::context_ops` (see that module).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Panics the engine contains (inside Automerge) are not crashes: keep
    // the default hook so they unwind to where the engine catches them.
    converge_fuzz_hook();
    converge_proto::fuzz::context_ops(data);
});

fn converge_fuzz_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}
