//! The codec under random input: every message round-trips, its encoded
//! length is what it really is, and no byte string — random, truncated,
//! mutated or deliberately malformed — makes the decoder panic.

use converge_core::wire::{
    self, DecodeError, DocMessage, DocumentId, EphemeralMessage, Message, PeerId, PeerMetadata,
    RemoteHeads, SessionId, StorageId,
};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-]{1,40}"
}

fn peer() -> impl Strategy<Value = PeerId> {
    name().prop_map(|s| PeerId::new(&s).expect("valid"))
}

fn storage() -> impl Strategy<Value = StorageId> {
    name().prop_map(|s| StorageId::new(&s).expect("valid"))
}

fn doc_id() -> impl Strategy<Value = DocumentId> {
    prop::collection::vec(any::<u8>(), 1..40)
        .prop_map(|b| DocumentId::from_bytes(&b).expect("valid"))
}

fn metadata() -> impl Strategy<Value = PeerMetadata> {
    (prop::option::of(storage()), prop::option::of(any::<bool>())).prop_map(
        |(storage_id, is_ephemeral)| PeerMetadata {
            storage_id,
            is_ephemeral,
        },
    )
}

fn doc_message() -> impl Strategy<Value = DocMessage> {
    (
        peer(),
        peer(),
        doc_id(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(sender_id, target_id, document_id, data)| DocMessage {
            sender_id,
            target_id,
            document_id,
            data,
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            peer(),
            prop::option::of(metadata()),
            prop::option::of(prop::collection::vec(name(), 0..3))
        )
            .prop_map(
                |(sender_id, metadata, supported_protocol_versions)| Message::Join {
                    sender_id,
                    metadata,
                    supported_protocol_versions
                }
            ),
        (peer(), peer(), prop::option::of(metadata()), name()).prop_map(
            |(sender_id, target_id, metadata, selected_protocol_version)| Message::Peer {
                sender_id,
                target_id,
                metadata,
                selected_protocol_version
            }
        ),
        doc_message().prop_map(Message::Sync),
        doc_message().prop_map(Message::Request),
        (peer(), peer(), doc_id()).prop_map(|(sender_id, target_id, document_id)| {
            Message::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            }
        }),
        (doc_message(), 0u64..(1 << 53), name()).prop_map(|(d, count, session)| {
            Message::Ephemeral(EphemeralMessage {
                sender_id: d.sender_id,
                target_id: d.target_id,
                document_id: d.document_id,
                count,
                session_id: SessionId::new(&session).expect("valid"),
                data: d.data,
            })
        }),
        (
            peer(),
            peer(),
            prop::option::of(prop::collection::vec(storage(), 0..3)),
            prop::option::of(prop::collection::vec(storage(), 0..3))
        )
            .prop_map(|(sender_id, target_id, add, remove)| {
                Message::RemoteSubscriptionChange {
                    sender_id,
                    target_id,
                    add,
                    remove,
                }
            }),
        (
            peer(),
            peer(),
            doc_id(),
            prop::collection::btree_map(
                storage(),
                (prop::collection::vec(name(), 0..3), 0u64..(1 << 53)),
                0..3
            )
        )
            .prop_map(|(sender_id, target_id, document_id, heads)| {
                Message::RemoteHeadsChanged {
                    sender_id,
                    target_id,
                    document_id,
                    new_heads: heads
                        .into_iter()
                        .map(|(s, (heads, t))| {
                            (
                                s,
                                RemoteHeads {
                                    heads,
                                    timestamp: t as f64,
                                },
                            )
                        })
                        .collect(),
                }
            }),
        (
            prop::option::of(peer()),
            prop::option::of(peer()),
            ".{0,80}"
        )
            .prop_map(|(sender_id, target_id, message)| Message::Error {
                sender_id,
                target_id,
                message
            }),
        peer().prop_map(|sender_id| Message::Leave { sender_id }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(m in message()) {
        let bytes = wire::encode(&m);
        prop_assert_eq!(wire::decode(&bytes), Ok(m));
    }

    #[test]
    fn every_strict_prefix_is_an_error(m in message()) {
        let bytes = wire::encode(&m);
        for cut in 0..bytes.len() {
            prop_assert!(wire::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn mutated_messages_never_panic(m in message(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut bytes = wire::encode(&m);
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        let _ = wire::decode(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = wire::decode(&bytes);
    }
}

/// Builds a CBOR map from (key, raw CBOR value) pairs.
fn map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0xa0 | entries.len() as u8];
    for (k, v) in entries {
        out.extend(text(k));
        out.extend_from_slice(v);
    }
    out
}

fn text(s: &str) -> Vec<u8> {
    let mut out = if s.len() < 24 {
        vec![0x60 | s.len() as u8]
    } else {
        vec![0x78, s.len() as u8]
    };
    out.extend_from_slice(s.as_bytes());
    out
}

#[test]
fn each_malformed_shape_is_a_clear_error() {
    let doc = DocumentId::from_random([5; 16]).to_string();
    let good_sync = |extra: &[(&str, Vec<u8>)]| {
        let mut e = vec![
            ("type", text("sync")),
            ("senderId", text("a")),
            ("targetId", text("b")),
            ("documentId", text(&doc)),
            ("data", vec![0x41, 0x42]),
        ];
        for (k, v) in extra {
            e.retain(|(x, _)| x != k);
            e.push((k, v.clone()));
        }
        map(&e)
    };
    assert!(wire::decode(&good_sync(&[])).is_ok(), "baseline decodes");
    type Expect = fn(&DecodeError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("empty", vec![], |e| matches!(e, DecodeError::Cbor(_))),
        ("not cbor", vec![0xff, 0x00], |e| {
            matches!(e, DecodeError::Cbor(_) | DecodeError::NotAMap)
        }),
        ("array", vec![0x81, 0x01], |e| {
            matches!(e, DecodeError::NotAMap)
        }),
        ("text", text("hello"), |e| matches!(e, DecodeError::NotAMap)),
        ("no type", map(&[("senderId", text("a"))]), |e| {
            matches!(e, DecodeError::MissingField("type"))
        }),
        ("type not text", map(&[("type", vec![0x01])]), |e| {
            matches!(e, DecodeError::WrongType { .. })
        }),
        ("unknown type", map(&[("type", text("gossip"))]), |e| {
            matches!(e, DecodeError::UnknownType(_))
        }),
        (
            "sender is a number",
            good_sync(&[("senderId", vec![0x05])]),
            |e| {
                matches!(
                    e,
                    DecodeError::WrongType {
                        field: "senderId",
                        ..
                    }
                )
            },
        ),
        ("sender empty", good_sync(&[("senderId", text(""))]), |e| {
            matches!(
                e,
                DecodeError::BadId {
                    field: "senderId",
                    ..
                }
            )
        }),
        (
            "bad document id",
            good_sync(&[("documentId", text("not-base58!"))]),
            |e| {
                matches!(
                    e,
                    DecodeError::BadId {
                        field: "documentId",
                        ..
                    }
                )
            },
        ),
        ("data as text", good_sync(&[("data", text("xyz"))]), |e| {
            matches!(e, DecodeError::WrongType { field: "data", .. })
        }),
        ("data null", good_sync(&[("data", vec![0xf6])]), |e| {
            matches!(e, DecodeError::MissingField("data"))
        }),
        (
            "trailing bytes",
            {
                let mut b = good_sync(&[]);
                b.push(0);
                b
            },
            |e| matches!(e, DecodeError::TrailingBytes(1)),
        ),
        (
            "deep nesting",
            good_sync(&[("x", {
                let mut v = vec![0x81; 100];
                v.push(0);
                v
            })]),
            |e| matches!(e, DecodeError::TooDeep),
        ),
        (
            "huge declared array",
            good_sync(&[(
                "x",
                vec![0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            )]),
            |e| matches!(e, DecodeError::Cbor(_)),
        ),
        (
            "huge declared bytes",
            good_sync(&[(
                "data",
                vec![0x5b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            )]),
            |e| matches!(e, DecodeError::Cbor(_)),
        ),
    ];
    for (what, bytes, expected) in cases {
        match wire::decode(&bytes) {
            Ok(m) => panic!("{what}: decoded to {m:?}"),
            Err(e) => assert!(expected(&e), "{what}: unexpected error {e}"),
        }
    }
    // Ephemeral counts: negative, fractional and non-finite are refused.
    let eph = |count: Vec<u8>| {
        map(&[
            ("type", text("ephemeral")),
            ("senderId", text("a")),
            ("targetId", text("b")),
            ("documentId", text(&doc)),
            ("data", vec![0x40]),
            ("sessionId", text("s")),
            ("count", count),
        ])
    };
    assert!(wire::decode(&eph(vec![0x07])).is_ok());
    assert!(
        wire::decode(&eph(vec![0xfb, 0x40, 0x1c, 0, 0, 0, 0, 0, 0])).is_ok(),
        "7.0 as float64"
    );
    for bad in [
        vec![0x20],
        vec![0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0],
        vec![0xfb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
    ] {
        assert!(matches!(
            wire::decode(&eph(bad)),
            Err(DecodeError::WrongType { field: "count", .. })
        ));
    }
}

#[test]
fn optional_fields_accept_null_and_undefined() {
    for absent in [0xf6u8, 0xf7] {
        let bytes = map(&[
            ("type", text("join")),
            ("senderId", text("a")),
            ("peerMetadata", vec![absent]),
            ("supportedProtocolVersions", vec![absent]),
        ]);
        assert_eq!(
            wire::decode(&bytes),
            Ok(Message::Join {
                sender_id: PeerId::new("a").expect("valid"),
                metadata: None,
                supported_protocol_versions: None,
            })
        );
    }
}
