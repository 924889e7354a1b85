#![no_main]
//! The token parser: the bytes as a JWT (header, signature check with a
//! fixed HS256 key, claims) and as the claims JSON a verified token
//! carries (`converge_proto::fuzz::claims`).

use converge_proto::engine::Claims;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    converge_proto::fuzz::contain_panics();
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = jsonwebtoken::decode_header(token);
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let key = DecodingKey::from_secret(b"fuzzing secret, 32 bytes or more!");
        if let Ok(data) = jsonwebtoken::decode::<Claims>(token, &key, &validation) {
            let _ = data.claims.grant();
        }
    }
    converge_proto::fuzz::claims(data);
});
