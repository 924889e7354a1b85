//! Who is asking: tokens, and what they grant.
//!
//! A platform's backend decides who may do what and says so in a signed
//! JWT; the relay checks it before a WebSocket is upgraded or an HTTP
//! request is served, and turns its claims into a [`Grant`] that the
//! engine enforces on every message. Claims (README, "Authentication"):
//!
//! ```json
//! {"sub": "alice", "exp": 1767225600, "jti": "optional",
//!  "converge": {"docs": {"<documentId>": "write", "*": "read"}, "create": true, "admin": false}}
//! ```
//!
//! Keys: one HS256 secret and any number of Ed25519 (EdDSA) or P-256
//! (ES256) public keys, each with a key id (`kid`) so keys can rotate. A
//! token is checked only against keys of the algorithm its header names
//! (and of its `kid`, if it has one): an HS256 token is never checked
//! against a public key, `alg: none` is not an algorithm here at all.
//! `exp` is required; `nbf` is checked; both with [`LEEWAY_SECS`] of
//! leeway; `aud` and `iss` when configured.
//!
//! Tokens never reach the logs: errors name what is wrong, not the token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::http::HeaderMap;
use converge_core::engine::{Access, Grant};
pub use converge_core::engine::{Claims, ClaimsError, Rights};
use converge_core::storage::{BatchOp, Storage, StorageKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;

/// Seconds of clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// Who may connect without a token when keys are configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anonymous {
    /// Nobody.
    None,
    /// Anyone may read every document.
    Read,
    /// Anyone may read and write every document and bring new ones.
    Write,
}

/// The settings [`Auth::open`] reads.
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    /// File holding the HS256 secret (its bytes, trailing newline dropped).
    pub secret_file: Option<PathBuf>,
    /// Public key files (PEM): `KID=PATH`, or `PATH` (the kid is the file
    /// name without extension).
    pub public_keys: Vec<String>,
    /// Required `aud`, if any.
    pub audience: Option<String>,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
    /// Access without a token.
    pub anonymous: Option<Anonymous>,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Why a request carries no usable identity. The message is safe to
/// show: it never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, and anonymous access is off.
    #[error("a token is required (Authorization: Bearer, ?token= or the converge_token cookie)")]
    Missing,
    /// Not a JWT, or an algorithm this relay does not take.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// No configured key of the token's algorithm (and `kid`).
    #[error("no key for this token's algorithm or key id")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is still ahead.
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` or `iss` is not the configured one.
    #[error("token for another audience or issuer")]
    WrongAudience,
    /// The claims do not parse (a bad document id, a bad right).
    #[error("bad claims: {0}")]
    BadClaims(String),
    /// Its subject or id was revoked.
    #[error("token revoked")]
    Revoked,
}

/// Revoked subjects and token ids, with when (ms): kept in the store so a
/// restart does not forget them.
#[derive(Debug, Default)]
struct Revocations {
    subjects: BTreeMap<String, u64>,
    tokens: BTreeMap<String, u64>,
}

/// The relay's token checker.
pub struct Auth {
    keys: Vec<Key>,
    audience: Option<String>,
    issuer: Option<String>,
    /// Shared by every anonymous connection (one allocation, not one
    /// per connection).
    anonymous: Option<Arc<Grant>>,
    /// What every request gets when no key is configured.
    everything: Arc<Grant>,
    revoked: RwLock<Revocations>,
    storage: Arc<dyn Storage>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.keys.len())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("anonymous", &self.anonymous.is_some())
            .finish()
    }
}

fn read_key_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read key file {}: {e}", path.display()))
}

/// The secret in a secret file: its bytes without a trailing newline.
pub fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut secret = read_key_file(path)?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < 32 {
        anyhow::bail!(
            "the secret in {} is {} bytes; HS256 needs at least 32",
            path.display(),
            secret.len()
        );
    }
    Ok(secret)
}

/// A public key file: Ed25519 or P-256, PEM.
fn public_key(spec: &str) -> anyhow::Result<Key> {
    let (kid, path) = match spec.split_once('=') {
        Some((kid, path)) => (kid.to_owned(), PathBuf::from(path)),
        None => {
            let path = PathBuf::from(spec);
            let kid = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            (kid, path)
        }
    };
    let pem = read_key_file(&path)?;
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok(Key {
            kid: Some(kid),
            alg: Algorithm::EdDSA,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok(Key {
            kid: Some(kid),
            alg: Algorithm::ES256,
            key,
        });
    }
    anyhow::bail!(
        "{} is not an Ed25519 or P-256 public key in PEM",
        path.display()
    )
}

fn revocation_key(kind: &str, value: &str) -> StorageKey {
    StorageKey::new(["revoked".to_owned(), kind.to_owned(), hex::encode(value)])
}

impl Auth {
    /// Reads the keys and the stored revocations. With no key at all the
    /// relay is open: every request may do everything.
    pub fn open(settings: &AuthSettings, storage: Arc<dyn Storage>) -> anyhow::Result<Auth> {
        let mut keys = Vec::new();
        if let Some(path) = &settings.secret_file {
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(&read_secret(path)?),
            });
        }
        for spec in &settings.public_keys {
            keys.push(public_key(spec)?);
        }
        let anonymous = match (keys.is_empty(), settings.anonymous) {
            (true, None) => Some(Arc::new(Grant::everything())),
            (_, Some(Anonymous::Write)) => Some(Arc::new(Grant::anonymous(Access::Write))),
            (_, Some(Anonymous::Read)) => Some(Arc::new(Grant::anonymous(Access::Read))),
            (true, Some(Anonymous::None)) => {
                anyhow::bail!("--allow-anonymous none needs a key (--jwt-secret-file or --jwt-public-key-file)")
            }
            (false, _) => None,
        };
        let mut revoked = Revocations::default();
        for (key, value) in storage.range(&StorageKey::new(["revoked"]))? {
            let parts = key.parts();
            let (Some(kind), Some(name)) = (parts.get(1), parts.get(2)) else {
                continue;
            };
            let Some(name) = hex::decode(name)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
            else {
                continue;
            };
            let at = std::str::from_utf8(&value)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(u64::MAX);
            match kind.as_str() {
                "sub" => revoked.subjects.insert(name, at),
                "jti" => revoked.tokens.insert(name, at),
                _ => None,
            };
        }
        Ok(Auth {
            keys,
            audience: settings.audience.clone(),
            issuer: settings.issuer.clone(),
            anonymous,
            everything: Arc::new(Grant::everything()),
            revoked: RwLock::new(revoked),
            storage,
        })
    }

    /// Whether the relay takes requests without a token for everything.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// What anonymous requests get, if anything.
    pub fn anonymous(&self) -> Option<&Grant> {
        self.anonymous.as_deref()
    }

    /// The grant of a request: its token's, the anonymous one if it has
    /// none (and that is allowed), or why it has neither.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Arc<Grant>, AuthError> {
        if self.is_open() {
            return Ok(self.everything.clone());
        }
        match token_of(headers, query) {
            Some(token) => self.verify(&token).map(Arc::new),
            None => self.anonymous.clone().ok_or(AuthError::Missing),
        }
    }

    /// Checks one token.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if !matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::EdDSA | Algorithm::ES256
        ) {
            return Err(AuthError::Malformed(format!(
                "algorithm {:?} is not accepted (HS256, EdDSA, ES256)",
                header.alg
            )));
        }
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey);
        }
        let mut last = AuthError::BadSignature;
        for key in candidates {
            let mut validation = Validation::new(key.alg);
            validation.leeway = LEEWAY_SECS;
            validation.validate_nbf = true;
            let mut required = vec!["exp"];
            match &self.audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    required.push("aud");
                }
                None => validation.validate_aud = false,
            }
            if let Some(iss) = &self.issuer {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            validation.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    self.check_revoked(&data.claims)?;
                    return data
                        .claims
                        .grant()
                        .map_err(|e| AuthError::BadClaims(e.to_string()));
                }
                Err(e) => last = classify(e),
            }
        }
        Err(last)
    }

    fn check_revoked(&self, claims: &Claims) -> Result<(), AuthError> {
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        if claims
            .jti
            .as_ref()
            .is_some_and(|jti| revoked.tokens.contains_key(jti))
        {
            return Err(AuthError::Revoked);
        }
        if let Some(at) = claims.sub.as_ref().and_then(|s| revoked.subjects.get(s)) {
            // Tokens issued after the revocation are the backend's new
            // word on that user; older ones (or without `iat`) are out.
            let issued_ms = claims.iat.map(|s| s.saturating_mul(1000));
            if issued_ms.is_none_or(|issued| issued <= *at) {
                return Err(AuthError::Revoked);
            }
        }
        Ok(())
    }

    /// Records a revocation (kept across restarts). Tokens of `subject`
    /// issued until now, and the token `token_id`, are refused from now
    /// on.
    pub fn revoke(
        &self,
        subject: Option<&str>,
        token_id: Option<&str>,
        now_ms: u64,
    ) -> anyhow::Result<()> {
        let mut ops = Vec::new();
        let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        if let Some(sub) = subject {
            revoked.subjects.insert(sub.to_owned(), now_ms);
            ops.push(BatchOp::Put(
                revocation_key("sub", sub),
                now_ms.to_string().into_bytes(),
            ));
        }
        if let Some(jti) = token_id {
            revoked.tokens.insert(jti.to_owned(), now_ms);
            ops.push(BatchOp::Put(
                revocation_key("jti", jti),
                now_ms.to_string().into_bytes(),
            ));
        }
        self.storage.batch(ops)?;
        Ok(())
    }
}

fn classify(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => AuthError::WrongAudience,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::Json(e) => AuthError::BadClaims(e.to_string()),
        ErrorKind::MissingRequiredClaim(c) => AuthError::BadClaims(format!("`{c}` is required")),
        _ => AuthError::Malformed(e.to_string()),
    }
}

/// The token of a request: `Authorization: Bearer`, else the `token`
/// query parameter (the only way a stock browser WebSocket can send one),
/// else the `converge_token` cookie.
pub fn token_of(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned());
    if bearer.is_some() {
        return bearer;
    }
    let from_query = query.and_then(|q| {
        q.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name == "token").then(|| percent_decode(value))
        })
    });
    if from_query.is_some() {
        return from_query;
    }
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == "converge_token").then(|| value.to_owned())
        })
}

/// Undoes `%XX` escapes (JWTs are URL-safe; a client may still escape).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Signs `claims` with an HS256 secret (`converge-server token`, tests).
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use converge_core::storage::MemoryStorage;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn auth() -> Auth {
        // One directory per call: the tests run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("converge-auth-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("secret");
        std::fs::write(&file, [SECRET, b"\n"].concat()).expect("write");
        let settings = AuthSettings {
            secret_file: Some(file),
            ..AuthSettings::default()
        };
        Auth::open(&settings, Arc::new(MemoryStorage::new())).expect("open")
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn claims() -> Claims {
        Claims {
            sub: Some("alice".into()),
            exp: now() + 600,
            iat: Some(now()),
            converge: Rights {
                docs: [("*".to_owned(), Access::Read)].into(),
                ..Rights::default()
            },
            ..Claims::default()
        }
    }

    #[test]
    fn a_good_token_grants_its_claims_and_a_bad_one_nothing() {
        let auth = auth();
        let token = mint_hs256(SECRET, &claims()).expect("mint");
        let grant = auth.verify(&token).expect("valid");
        assert_eq!(grant.subject.as_deref(), Some("alice"));
        assert_eq!(grant.every, Access::Read);
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 3;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert!(auth.verify(&flipped).is_err());
        let other = mint_hs256(b"another secret of 32 bytes or more!", &claims()).expect("mint");
        assert_eq!(auth.verify(&other), Err(AuthError::BadSignature));
        let expired = Claims {
            exp: now() - 3600,
            ..claims()
        };
        let expired = mint_hs256(SECRET, &expired).expect("mint");
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        let early = Claims {
            nbf: Some(now() + 3600),
            ..claims()
        };
        let early = mint_hs256(SECRET, &early).expect("mint");
        assert_eq!(auth.verify(&early), Err(AuthError::NotYetValid));
        // `alg: none`: header {"alg":"none"}, no signature.
        let none =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(matches!(auth.verify(none), Err(AuthError::Malformed(_))));
        assert!(matches!(
            auth.verify("not a token"),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn revoked_subjects_lose_older_tokens_and_revoked_ids_their_token() {
        let auth = auth();
        let old = Claims {
            iat: Some(now() - 10),
            jti: Some("t1".into()),
            ..claims()
        };
        let token = mint_hs256(SECRET, &old).expect("mint");
        assert!(auth.verify(&token).is_ok());
        auth.revoke(Some("alice"), None, now() * 1000 - 5000)
            .expect("revoke");
        assert_eq!(auth.verify(&token), Err(AuthError::Revoked));
        let newer = Claims {
            iat: Some(now()),
            ..claims()
        };
        assert!(auth
            .verify(&mint_hs256(SECRET, &newer).expect("mint"))
            .is_ok());
        auth.revoke(None, Some("t2"), now() * 1000).expect("revoke");
        let t2 = Claims {
            sub: Some("bob".into()),
            jti: Some("t2".into()),
            ..claims()
        };
        assert_eq!(
            auth.verify(&mint_hs256(SECRET, &t2).expect("mint")),
            Err(AuthError::Revoked)
        );
    }

    #[test]
    fn tokens_come_from_the_header_the_query_or_a_cookie() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            token_of(&headers, Some("a=1&token=abc%2Ed")),
            Some("abc.d".into())
        );
        headers.insert(
            "cookie",
            "x=1; converge_token=fromcookie".parse().expect("header"),
        );
        assert_eq!(token_of(&headers, None), Some("fromcookie".into()));
        headers.insert(
            "authorization",
            "Bearer fromheader".parse().expect("header"),
        );
        assert_eq!(
            token_of(&headers, Some("token=q")),
            Some("fromheader".into())
        );
    }
}
