//! Topics: their names, the patterns that say who may subscribe to which,
//! and the message a subscriber's socket receives.
//!
//! A topic belongs to a tenant: the same name in two tenants is two topics,
//! and nothing published in one ever reaches the other. Its name is 1 to
//! [`MAX_ID_BYTES`] bytes without a control character (the one id rule,
//! [`crate::ids::unusable`]), by convention segments separated by `/`
//! (`orders/42`).
//!
//! A pattern (a token's `topics` claim, or a configured rule) is a topic
//! name whose segments may also be:
//! - `*`: exactly one segment, whatever it is (`orders/*` matches
//!   `orders/42`, not `orders` nor `orders/42/lines`);
//! - `**`, as the last segment only: one or more segments (`orders/**`
//!   matches `orders/42` and `orders/42/lines`);
//! - `{user_id}`: the subscribing client's user id, so one rule can give
//!   every user their own topics (`users/{user_id}/*`).

use serde_json::{Value, json};

use crate::ids::{MAX_ID_BYTES, UserId};
use crate::store::TopicPosition;

/// Why a topic name cannot be used, if it cannot.
pub fn unusable(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return Some("is empty".to_owned());
    }
    crate::ids::unusable(topic)
}

/// Why a pattern cannot be used, if it cannot: a topic name whose `**`, if
/// any, is the last segment.
pub fn unusable_pattern(pattern: &str) -> Option<String> {
    if let Some(why) = unusable(pattern) {
        return Some(why);
    }
    let segments: Vec<&str> = pattern.split('/').collect();
    if segments[..segments.len() - 1].contains(&"**") {
        return Some("uses `**` before its last segment".to_owned());
    }
    None
}

/// Whether `pattern` allows `user` to subscribe to `topic` (see the
/// module doc). A pattern that is not usable allows nothing.
pub fn allows(pattern: &str, topic: &str, user: &UserId) -> bool {
    matches_for(pattern, topic, Some(user))
}

/// Whether `topic` matches `pattern`, for a rule about topics rather than
/// subscribers (a `{user_id}` segment matches nothing).
pub fn matches(pattern: &str, topic: &str) -> bool {
    matches_for(pattern, topic, None)
}

fn matches_for(pattern: &str, topic: &str, user: Option<&UserId>) -> bool {
    if unusable_pattern(pattern).is_some() || topic.len() > MAX_ID_BYTES {
        return false;
    }
    let mut wanted = pattern.split('/');
    let mut given = topic.split('/');
    loop {
        match (wanted.next(), given.next()) {
            (None, None) => return true,
            (Some("**"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some("{user_id}"), Some(segment)) if user.is_some_and(|u| u.as_str() == segment) => {}
            (Some(literal), Some(segment)) if literal == segment => {}
            _ => return false,
        }
    }
}

/// Whether any of `patterns` allows it.
pub fn any_allows<'a>(
    patterns: impl IntoIterator<Item = &'a String>,
    topic: &str,
    user: &UserId,
) -> bool {
    patterns
        .into_iter()
        .any(|pattern| allows(pattern, topic, user))
}

/// What a subscriber's socket receives for one message:
/// `{"type":"message","topic","epoch","offset","data"}`.
pub fn message(topic: &str, position: &TopicPosition, data: &Value) -> Value {
    json!({
        "type": "message",
        "topic": topic,
        "epoch": position.epoch,
        "offset": position.offset,
        "data": data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserId {
        UserId::from("alice")
    }

    #[test]
    fn a_star_is_exactly_one_segment() {
        assert!(allows("orders/*", "orders/42", &alice()));
        assert!(!allows("orders/*", "orders", &alice()));
        assert!(!allows("orders/*", "orders/42/lines", &alice()));
        assert!(!allows("orders/*", "invoices/42", &alice()));
        assert!(allows("*/summary", "orders/summary", &alice()));
    }

    #[test]
    fn a_trailing_double_star_is_one_or_more_segments() {
        assert!(allows("orders/**", "orders/42", &alice()));
        assert!(allows("orders/**", "orders/42/lines", &alice()));
        assert!(!allows("orders/**", "orders", &alice()));
        assert!(allows("**", "anything/at/all", &alice()));
        // Anywhere else it is refused, and allows nothing.
        assert!(unusable_pattern("a/**/b").is_some());
        assert!(!allows("a/**/b", "a/x/b", &alice()));
    }

    #[test]
    fn literals_match_whole_segments_exactly() {
        assert!(allows("news", "news", &alice()));
        assert!(!allows("news", "newsletter", &alice()));
        assert!(!allows("news", "news/", &alice()));
        assert!(!allows("orders/4", "orders/42", &alice()));
    }

    #[test]
    fn user_id_stands_for_the_subscriber() {
        assert!(allows("users/{user_id}/*", "users/alice/inbox", &alice()));
        assert!(!allows("users/{user_id}/*", "users/bob/inbox", &alice()));
    }

    #[test]
    fn a_rule_about_topics_matches_no_user() {
        assert!(matches("prices/*", "prices/eur"));
        assert!(!matches("users/{user_id}", "users/alice"));
    }

    #[test]
    fn names_follow_the_id_rule_and_are_never_empty() {
        assert!(unusable("orders/42").is_none());
        assert!(unusable("").is_some());
        assert!(unusable("a\u{1f}b").is_some());
        assert!(unusable(&"x".repeat(MAX_ID_BYTES + 1)).is_some());
    }

    #[test]
    fn a_message_names_its_topic_and_place() {
        let position = TopicPosition {
            epoch: "e1".into(),
            offset: 7,
        };
        assert_eq!(
            message("orders/42", &position, &json!({"total": 3})).to_string(),
            r#"{"type":"message","topic":"orders/42","epoch":"e1","offset":7,"data":{"total":3}}"#
        );
    }
}
