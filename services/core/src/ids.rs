//! The identifiers Streamer passes around, one type each, so that one can
//! never be handed where another is expected (a request's server id where
//! the client's id goes, an edge id where a connection id goes).
//!
//! | type | what it names | who assigns it |
//! |---|---|---|
//! | [`ConnectionId`] | one WebSocket connection | the edge that accepted the socket (a UUID) |
//! | [`EdgeId`] | one edge (gateway) process | the edge's configuration, put under its certificate's name in mode `mtls` |
//! | [`TenantId`] | a tenant | the client's verified token (`tenant_id` claim) |
//! | [`UserId`] | a user within a tenant | the client's verified token (`user_id` claim) |
//! | [`RequestId`] | a long-running request, globally | Streamer, when the request is submitted (a UUIDv7) |
//! | [`ClientRequestId`] | a frame or request, as its client knows it | the client (its frame's `id`); unique per user, or made up by Streamer when the client gave none |
//!
//! Every one is a string on the wire and in the store: in the protobuf
//! messages, in the JSON a client sees, in the embedded store's records and
//! keys, and in DynamoDB's items. The types exist only inside the process:
//! they serialise as the bare string (`#[serde(transparent)]`), and they
//! are made from strings where one comes in (the gRPC adapters validate
//! ids from callers there, refusing empty or malformed ones with
//! INVALID_ARGUMENT) and turned back into strings where one goes out.
//!
//! None of them dereferences to `str`: a conversion is always written
//! ([`as_str`](ConnectionId::as_str), `into()`), so an id never silently
//! turns back into a string and then into another kind of id.

/// The longest id (or indexed name, such as an action or a topic), in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Why `value` cannot be an id or a name the stores index, if it cannot:
/// the one rule every entry point applies (the gRPC adapters, the token
/// validator, the edge's frame parser). Bounded by [`MAX_ID_BYTES`], and
/// free of control characters: the stores join fields with them (NUL in
/// the embedded store's keys, U+001F in DynamoDB's), so one inside an id
/// could make two tenants' keys collide. Empty is the caller's business
/// (required or "not given").
pub fn unusable(value: &str) -> Option<String> {
    if value.len() > MAX_ID_BYTES {
        return Some(format!("is longer than {MAX_ID_BYTES} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Some("contains a control character".to_owned());
    }
    None
}

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Defines one identifier type: a string, with every conversion the rule
/// above allows and nothing more.
macro_rules! id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string, without a copy.
            pub fn into_string(self) -> String {
                self.0
            }

            /// Whether the id is empty (an optional field left unset).
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Hash, equality and order agree with the string's, so maps and
        /// sets keyed by the id can be searched with a `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

id! {
    /// One WebSocket connection, named by the edge that accepted it.
    ConnectionId
}

id! {
    /// One edge process, holding sockets and attached to ConnectionService.
    EdgeId
}

id! {
    /// A tenant, from the client's verified token.
    TenantId
}

id! {
    /// A user within a tenant, from the client's verified token.
    UserId
}

id! {
    /// The id Streamer gives a request when it is submitted: globally unique.
    RequestId
}

id! {
    /// The id a client gave its frame or request: unique within its user, and
    /// what the client's own messages about it carry (`request_id`).
    ClientRequestId
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    #[test]
    fn an_id_is_a_bare_string_in_json() {
        let id = ConnectionId::from("c-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""c-1""#);
        let back: ConnectionId = serde_json::from_str(r#""c-1""#).unwrap();
        assert_eq!(back, id);
        assert_eq!(
            serde_json::to_value(vec![RequestId::from("r1")]).unwrap(),
            serde_json::json!(["r1"])
        );
    }

    #[test]
    fn maps_and_sets_of_ids_are_searched_with_str() {
        let map = HashMap::from([(ConnectionId::from("c1"), 1)]);
        assert_eq!(map.get("c1"), Some(&1));
        assert_eq!(map.get("c2"), None);
        let set: BTreeSet<TenantId> = ["a".into(), "b".into()].into();
        assert!(set.contains("a"));
        assert!(!set.contains("c"));
    }

    #[test]
    fn conversions_and_comparisons() {
        let id = UserId::from(String::from("alice"));
        assert_eq!(id, "alice");
        assert_eq!(id, *"alice");
        assert_eq!(id.as_str(), "alice");
        assert_eq!(id.to_string(), "alice");
        assert_eq!(AsRef::<str>::as_ref(&id), "alice");
        assert_eq!(String::from(id.clone()), "alice");
        assert_eq!(id.into_string(), "alice");
        assert!(EdgeId::default().is_empty());
        // Ordered as their strings, so an id-ordered page is a string-ordered one.
        let (a, b) = (ClientRequestId::from("a"), ClientRequestId::from("b"));
        assert!(a < b);
    }

    #[test]
    fn an_id_is_bounded_and_free_of_the_stores_separators() {
        assert_eq!(unusable("acme"), None);
        assert_eq!(unusable(&"x".repeat(MAX_ID_BYTES)), None);
        assert_eq!(unusable("ünïcödé/orders:42"), None);
        assert!(unusable(&"x".repeat(MAX_ID_BYTES + 1)).is_some());
        // NUL joins the embedded store's keys, U+001F DynamoDB's: with one
        // inside, tenant `a␟b` and user `c` would meet tenant `a` and user
        // `b␟c`.
        for bad in ["a\0b", "a\u{1f}b", "line\nbreak", "\u{7f}"] {
            assert_eq!(
                unusable(bad).as_deref(),
                Some("contains a control character"),
                "{bad:?}"
            );
        }
    }
}
