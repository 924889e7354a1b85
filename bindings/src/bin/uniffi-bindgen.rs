//! The uniffi binding generator, built from this workspace so it always
//! matches the library's uniffi version:
//! `cargo run -p converge-ffi --bin uniffi-bindgen -- generate --library <lib> --language python --out-dir <dir>`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
