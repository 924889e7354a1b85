#![no_main]
//! `converge_proto::fuzz::sync_message` (see that module).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    converge_proto::fuzz::contain_panics();
    converge_proto::fuzz::sync_message(data);
});
