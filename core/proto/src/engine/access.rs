//! Who may do what with a document.
//!
//! Two sources, and a peer's right on a document is the greater of them:
//! - the [`Grant`] its connection carries, decided before the connection
//!   reached the engine (on a relay: from the token the client presented;
//!   the `peerId` a client claims in `join` proves nothing);
//! - the document's [`Acl`], kept with the document: its owner (who brought
//!   it to this store) and users named read or write.
//!
//! The engine enforces the result on every message: a peer that may not
//! read a document is answered `doc-unavailable` exactly as for an unknown
//! one and never hears of it (sync, announcements, ephemeral messages); a
//! read-only peer syncs, but a message of its that carries changes is not
//! applied, stored or forwarded.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::wire::DocumentId;

/// A level of access to one document. Ordered: `None < Read < Write`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Not even its existence.
    #[default]
    None,
    /// Sync it and receive its changes and ephemeral messages.
    Read,
    /// Also change it.
    Write,
}

impl Access {
    /// Its name as in tokens and the API (`none`, `read`, `write`).
    pub fn name(self) -> &'static str {
        match self {
            Access::None => "none",
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one connection may do: decided outside the engine (from a token on
/// a relay), fixed for the connection's life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Who: the token's `sub`; `None` for an anonymous connection. The
    /// subject is what document access lists name.
    pub subject: Option<String>,
    /// The token's `jti`, if it had one (for revocation).
    pub token_id: Option<String>,
    /// Rights on named documents.
    pub docs: BTreeMap<DocumentId, Access>,
    /// Rights on every document (`"*"` in a token).
    pub every: Access,
    /// May bring documents this store does not hold yet (and so own them).
    pub create: bool,
    /// May do everything.
    pub admin: bool,
    /// When the grant ends (ms since the Unix epoch, the engine's clock):
    /// the engine closes the connection then.
    pub expires_ms: Option<u64>,
}

impl Grant {
    /// Everything, for ever: a store without authentication (and every
    /// peer an application connects itself).
    pub fn everything() -> Grant {
        Grant {
            subject: None,
            token_id: None,
            docs: BTreeMap::new(),
            every: Access::Write,
            create: true,
            admin: true,
            expires_ms: None,
        }
    }

    /// Only `every` on every document, anonymously (`--allow-anonymous
    /// read` gives `Grant::anonymous(Access::Read)`).
    pub fn anonymous(every: Access) -> Grant {
        Grant {
            subject: None,
            token_id: None,
            docs: BTreeMap::new(),
            every,
            create: every == Access::Write,
            admin: false,
            expires_ms: None,
        }
    }

    /// What this grant alone allows on `doc`.
    pub fn on(&self, doc: &DocumentId) -> Access {
        if self.admin {
            return Access::Write;
        }
        self.docs
            .get(doc)
            .copied()
            .unwrap_or_default()
            .max(self.every)
    }

    /// May this grant bring `doc` to a store that does not hold it? With
    /// `create`, or with write on it by name or by `"*"`.
    pub fn may_create(&self, doc: &DocumentId) -> bool {
        self.create || self.on(doc) == Access::Write
    }

    /// What this grant and the document's list give together on `doc`:
    /// the greater of the two.
    pub fn access(&self, acl: Option<&Acl>, doc: &DocumentId) -> Access {
        let listed = match (&self.subject, acl) {
            (Some(subject), Some(acl)) => acl.for_subject(subject),
            _ => Access::None,
        };
        self.on(doc).max(listed)
    }
}

impl Default for Grant {
    fn default() -> Self {
        Grant::everything()
    }
}

/// A document's access list, kept with the document (`doc/<id>/acl/list`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acl {
    /// Who brought the document to this store: keeps write on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Other subjects and their access.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, Access>,
}

impl Acl {
    /// What the list gives `subject`.
    pub fn for_subject(&self, subject: &str) -> Access {
        if self.owner.as_deref() == Some(subject) {
            return Access::Write;
        }
        self.users.get(subject).copied().unwrap_or_default()
    }

    /// Whether it names nobody.
    pub fn is_empty(&self) -> bool {
        self.owner.is_none() && self.users.is_empty()
    }

    /// The stored form (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the stored form; an unreadable one is an empty list (which
    /// grants nothing).
    pub fn decode(bytes: &[u8]) -> Acl {
        serde_json::from_slice(bytes).unwrap_or_default()
    }
}

/// Why a token's claims make no grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// A key of `converge.docs` is neither `*` nor a document id.
    #[error("`{0}` is not a document id")]
    BadDocument(String),
}

/// The claims of a Converge token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Token id (for revocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// What Converge grants.
    #[serde(default)]
    pub converge: Rights,
}

/// The `converge` claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rights {
    /// Document id (or `*`) to `read` / `write`.
    #[serde(default)]
    pub docs: BTreeMap<String, Access>,
    /// May bring new documents (and own them).
    #[serde(default)]
    pub create: bool,
    /// May do everything.
    #[serde(default)]
    pub admin: bool,
}

impl Claims {
    /// The grant these claims carry.
    pub fn grant(&self) -> Result<Grant, ClaimsError> {
        let mut docs = BTreeMap::new();
        let mut every = Access::None;
        for (key, access) in &self.converge.docs {
            if key == "*" {
                every = *access;
                continue;
            }
            let id: DocumentId = key
                .parse()
                .map_err(|_| ClaimsError::BadDocument(key.clone()))?;
            docs.insert(id, *access);
        }
        Ok(Grant {
            subject: self.sub.clone(),
            token_id: self.jti.clone(),
            docs,
            every,
            create: self.converge.create,
            admin: self.converge.admin,
            expires_ms: Some(self.exp.saturating_mul(1000)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u8) -> DocumentId {
        DocumentId::from_random([n; 16])
    }

    fn alice(docs: &[(u8, Access)]) -> Grant {
        Grant {
            subject: Some("alice".into()),
            docs: docs.iter().map(|&(n, a)| (doc(n), a)).collect(),
            ..Grant::anonymous(Access::None)
        }
    }

    #[test]
    fn a_grant_gives_the_greater_of_its_named_and_every_rights() {
        let g = Grant {
            every: Access::Read,
            ..alice(&[(1, Access::Write), (2, Access::None)])
        };
        assert_eq!(g.on(&doc(1)), Access::Write);
        assert_eq!(g.on(&doc(2)), Access::Read, "`*` still applies");
        assert_eq!(g.on(&doc(3)), Access::Read);
        assert_eq!(alice(&[]).on(&doc(3)), Access::None);
        let admin = Grant {
            admin: true,
            ..alice(&[])
        };
        assert_eq!(admin.on(&doc(9)), Access::Write);
    }

    #[test]
    fn creating_needs_create_or_write_on_that_document() {
        assert!(!alice(&[(1, Access::Read)]).may_create(&doc(1)));
        assert!(alice(&[(1, Access::Write)]).may_create(&doc(1)));
        assert!(!alice(&[(1, Access::Write)]).may_create(&doc(2)));
        let creator = Grant {
            create: true,
            ..alice(&[])
        };
        assert!(creator.may_create(&doc(2)));
        assert!(!Grant::anonymous(Access::Read).may_create(&doc(2)));
    }

    #[test]
    fn the_list_adds_to_the_token_and_the_owner_writes() {
        let acl = Acl {
            owner: Some("bob".into()),
            users: [("alice".to_owned(), Access::Read)].into(),
        };
        let d = doc(5);
        assert_eq!(alice(&[]).access(Some(&acl), &d), Access::Read);
        assert_eq!(
            alice(&[(5, Access::Write)]).access(Some(&acl), &d),
            Access::Write
        );
        let bob = Grant {
            subject: Some("bob".into()),
            ..alice(&[])
        };
        assert_eq!(bob.access(Some(&acl), &d), Access::Write);
        // Anonymous connections are never on a list.
        let anon = Grant::anonymous(Access::None);
        assert_eq!(anon.access(Some(&acl), &d), Access::None);
        assert_eq!(Acl::decode(&acl.encode()), acl);
        assert_eq!(Acl::decode(b"not json"), Acl::default());
    }

    /// Through the engine: a peer that may not read a document is told it
    /// is unavailable and never gets its ephemeral messages; a reader does.
    #[test]
    fn ephemeral_messages_reach_readers_only() {
        use crate::engine::{
            ConnectionId, Direction, Engine, EngineConfig, Input, RelayPolicy, Timestamp,
        };
        use crate::wire::{self, DocMessage, EphemeralMessage, Message, PeerId, SessionId};

        let relay = PeerId::new("relay").expect("valid");
        let mut cfg = EngineConfig::new(relay.clone(), None, 3);
        cfg.policy = std::sync::Arc::new(RelayPolicy);
        let mut engine = Engine::new(cfg);
        let now = Timestamp(1);
        let doc = crate::engine::created(&mut engine, now);
        let grant = |name: &str, access: Access| Grant {
            subject: Some(name.into()),
            docs: [(doc.clone(), access)].into(),
            ..Grant::anonymous(Access::None)
        };
        let peers = [
            ("writer", ConnectionId(1), grant("writer", Access::Write)),
            ("reader", ConnectionId(2), grant("reader", Access::Read)),
            ("stranger", ConnectionId(3), grant("stranger", Access::None)),
        ];
        let empty_sync = crate::engine::validate::empty_sync_message();
        let mut unavailable_to = Vec::new();
        for (name, conn, grant) in &peers {
            let peer = PeerId::new(name).expect("valid");
            engine.handle(
                now,
                Input::Connected {
                    conn: *conn,
                    direction: Direction::Incoming,
                    grant: grant.clone().into(),
                },
            );
            let join = Message::Join {
                sender_id: peer.clone(),
                metadata: None,
                supported_protocol_versions: Some(vec!["1".into()]),
            };
            engine.handle(
                now,
                Input::Received {
                    conn: *conn,
                    bytes: wire::encode(&join),
                },
            );
            let request = Message::Request(DocMessage {
                sender_id: peer,
                target_id: relay.clone(),
                document_id: doc.clone(),
                data: empty_sync.clone(),
            });
            let out = engine.handle(
                now,
                Input::Received {
                    conn: *conn,
                    bytes: wire::encode(&request),
                },
            );
            for send in out.sends {
                if matches!(send.message, Message::DocUnavailable { .. }) {
                    unavailable_to.push(send.conn);
                }
            }
        }
        assert_eq!(
            unavailable_to,
            vec![ConnectionId(3)],
            "only the stranger is refused"
        );
        let ephemeral = Message::Ephemeral(EphemeralMessage {
            sender_id: PeerId::new("writer").expect("valid"),
            target_id: relay.clone(),
            document_id: doc.clone(),
            count: 1,
            session_id: SessionId::new("s").expect("valid"),
            data: vec![0xa0],
        });
        let out = engine.handle(
            now,
            Input::Received {
                conn: ConnectionId(1),
                bytes: wire::encode(&ephemeral),
            },
        );
        let to: Vec<ConnectionId> = out
            .sends
            .iter()
            .filter(|s| matches!(s.message, Message::Ephemeral(_)))
            .map(|s| s.conn)
            .collect();
        assert_eq!(
            to,
            vec![ConnectionId(2)],
            "the reader gets it, the stranger never"
        );
    }
}
