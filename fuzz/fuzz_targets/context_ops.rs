#![no_main]
//! `converge_proto::fuzz::context_ops` (see that module).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    converge_proto::fuzz::contain_panics();
    converge_proto::fuzz::context_ops(data);
});
