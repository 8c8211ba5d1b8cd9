//! Wire types in, domain types out: every request is validated here, on its
//! way in, so the service logic never sees a tonic type or an unchecked id.

use streamer_api::v1;
use streamer_core::ids::{ConnectionId, EdgeId, TenantId, UserId};
use streamer_core::store::{ApiGatewayConnection, ConnectionRecord};
use streamer_core::timestamp;

use crate::error::ConnectionError;

/// Longest id, user, tenant or action accepted.
pub use streamer_core::ids::MAX_ID_BYTES;
/// Largest page of `ListConnections`.
pub const MAX_PAGE_SIZE: usize = 1000;
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most connection ids in one `Broadcast`.
pub const MAX_BROADCAST_IDS: usize = 10_000;
/// Close reasons must fit a WebSocket close frame (123 bytes).
pub const MAX_CLOSE_REASON_BYTES: usize = 120;

/// Checks an identifier from the wire: present, and usable as one (see
/// [`streamer_core::ids::unusable`]). It comes out as the type
/// the caller names ([`ConnectionId`], [`TenantId`], …, or a `String` for a
/// name that is no id).
pub fn required_id<T: From<String>>(
    field: &'static str,
    value: String,
) -> Result<T, ConnectionError> {
    if value.is_empty() {
        return Err(ConnectionError::invalid(field, "is required"));
    }
    optional_id(field, value)?.ok_or_else(|| ConnectionError::invalid(field, "is required"))
}

/// Like [`required_id`], but empty means "not given".
pub fn optional_id<T: From<String>>(
    field: &'static str,
    value: String,
) -> Result<Option<T>, ConnectionError> {
    if value.is_empty() {
        return Ok(None);
    }
    if let Some(why) = streamer_core::ids::unusable(&value) {
        return Err(ConnectionError::invalid(field, why));
    }
    Ok(Some(T::from(value)))
}

fn required_payload(payload: Option<v1::Payload>) -> Result<v1::Payload, ConnectionError> {
    let unusable = match &payload {
        Some(v1::Payload {
            body: Some(v1::payload::Body::Json(value)),
        }) => streamer_api::json::unusable(value),
        _ => None,
    };
    if let Some(why) = unusable {
        return Err(ConnectionError::invalid("payload.json", why));
    }
    match payload {
        Some(p) if p.body.is_some() => Ok(p),
        _ => Err(ConnectionError::invalid(
            "payload",
            "is required: set one of `json`, `text` or `binary`",
        )),
    }
}

#[derive(Debug)]
pub struct SendCommand {
    pub connection_id: ConnectionId,
    pub payload: v1::Payload,
    pub tenant_id: Option<TenantId>,
    pub sequence: Option<v1::Sequence>,
}

impl TryFrom<v1::SendRequest> for SendCommand {
    type Error = ConnectionError;
    fn try_from(r: v1::SendRequest) -> Result<Self, Self::Error> {
        let sequence = match r.sequence {
            Some(s) => Some(v1::Sequence {
                stream: required_id("sequence.stream", s.stream)?,
                number: s.number,
            }),
            None => None,
        };
        Ok(Self {
            connection_id: required_id("connection_id", r.connection_id)?,
            payload: required_payload(r.payload)?,
            tenant_id: optional_id("tenant_id", r.tenant_id)?,
            sequence,
        })
    }
}

#[derive(Debug, PartialEq)]
pub enum BroadcastTarget {
    Connections(Vec<ConnectionId>),
    User {
        tenant_id: TenantId,
        user_id: UserId,
    },
    Tenant(TenantId),
}

#[derive(Debug)]
pub struct BroadcastCommand {
    pub target: BroadcastTarget,
    pub payload: v1::Payload,
    pub tenant_id: Option<TenantId>,
}

impl TryFrom<v1::BroadcastRequest> for BroadcastCommand {
    type Error = ConnectionError;
    fn try_from(r: v1::BroadcastRequest) -> Result<Self, Self::Error> {
        use v1::broadcast_request::Target;
        let target = match r.target {
            None => {
                return Err(ConnectionError::invalid(
                    "target",
                    "is required: set one of `connections`, `user` or `tenant`",
                ));
            }
            Some(Target::Connections(c)) => {
                if c.ids.is_empty() {
                    return Err(ConnectionError::invalid("connections.ids", "is empty"));
                }
                if c.ids.len() > MAX_BROADCAST_IDS {
                    return Err(ConnectionError::invalid(
                        "connections.ids",
                        format!("has more than {MAX_BROADCAST_IDS} ids"),
                    ));
                }
                let mut ids = c
                    .ids
                    .into_iter()
                    .map(|id| required_id("connections.ids", id))
                    .collect::<Result<Vec<ConnectionId>, _>>()?;
                // A connection named twice still gets the payload once.
                let mut seen = std::collections::HashSet::new();
                ids.retain(|id| seen.insert(id.clone()));
                BroadcastTarget::Connections(ids)
            }
            Some(Target::User(u)) => BroadcastTarget::User {
                tenant_id: required_id("user.tenant_id", u.tenant_id)?,
                user_id: required_id("user.user_id", u.user_id)?,
            },
            Some(Target::Tenant(t)) => {
                BroadcastTarget::Tenant(required_id("tenant.tenant_id", t.tenant_id)?)
            }
        };
        Ok(Self {
            target,
            payload: required_payload(r.payload)?,
            tenant_id: optional_id("tenant_id", r.tenant_id)?,
        })
    }
}

/// Checks a topic name from the wire (see [`streamer_core::topics`]).
pub fn required_topic(field: &'static str, value: String) -> Result<String, ConnectionError> {
    match streamer_core::topics::unusable(&value) {
        Some(why) => Err(ConnectionError::invalid(field, why)),
        None => Ok(value),
    }
}

/// Whom a subscription is for.
#[derive(Debug, PartialEq)]
pub enum Subscriber {
    Connection(ConnectionId),
    /// Every connection the user has open.
    User(UserId),
}

/// A `Subscribe` or an `Unsubscribe`.
#[derive(Debug, PartialEq)]
pub struct SubscribeCommand {
    pub tenant_id: TenantId,
    pub topic: String,
    pub subscriber: Subscriber,
}

/// A subscription target as the wire gives it (each request type has its
/// own `oneof`).
enum WireSubscriber {
    Connection(String),
    User(String),
}

impl SubscribeCommand {
    fn from_wire(
        tenant_id: String,
        topic: String,
        target: Option<WireSubscriber>,
    ) -> Result<Self, ConnectionError> {
        let subscriber = match target {
            Some(WireSubscriber::Connection(id)) => {
                Subscriber::Connection(required_id("connection_id", id)?)
            }
            Some(WireSubscriber::User(user)) => Subscriber::User(required_id("user_id", user)?),
            None => {
                return Err(ConnectionError::invalid(
                    "target",
                    "is required: set one of `connection_id` or `user_id`",
                ));
            }
        };
        Ok(Self {
            tenant_id: required_id("tenant_id", tenant_id)?,
            topic: required_topic("topic", topic)?,
            subscriber,
        })
    }
}

impl TryFrom<v1::SubscribeRequest> for SubscribeCommand {
    type Error = ConnectionError;
    fn try_from(r: v1::SubscribeRequest) -> Result<Self, Self::Error> {
        use v1::subscribe_request::Target;
        let target = r.target.map(|t| match t {
            Target::ConnectionId(id) => WireSubscriber::Connection(id),
            Target::UserId(user) => WireSubscriber::User(user),
        });
        Self::from_wire(r.tenant_id, r.topic, target)
    }
}

impl TryFrom<v1::UnsubscribeRequest> for SubscribeCommand {
    type Error = ConnectionError;
    fn try_from(r: v1::UnsubscribeRequest) -> Result<Self, Self::Error> {
        use v1::unsubscribe_request::Target;
        let target = r.target.map(|t| match t {
            Target::ConnectionId(id) => WireSubscriber::Connection(id),
            Target::UserId(user) => WireSubscriber::User(user),
        });
        Self::from_wire(r.tenant_id, r.topic, target)
    }
}

/// A `Publish`.
#[derive(Debug, PartialEq)]
pub struct PublishCommand {
    pub tenant_id: TenantId,
    pub topic: String,
    /// The message's `data`.
    pub data: serde_json::Value,
    /// The conflation key; empty: the topic.
    pub key: String,
}

impl TryFrom<v1::PublishRequest> for PublishCommand {
    type Error = ConnectionError;
    fn try_from(r: v1::PublishRequest) -> Result<Self, Self::Error> {
        let tenant_id = required_id("tenant_id", r.tenant_id)?;
        let topic = required_topic("topic", r.topic)?;
        let data = match required_payload(r.payload)?.body {
            Some(v1::payload::Body::Json(value)) => streamer_api::json::from_proto(value),
            Some(v1::payload::Body::Text(text)) => serde_json::Value::String(text),
            _ => {
                return Err(ConnectionError::invalid(
                    "payload",
                    "topic messages are JSON: set `json` or `text`, not `binary`",
                ));
            }
        };
        let key: String = optional_id("key", r.key)?.unwrap_or_default();
        Ok(Self {
            tenant_id,
            topic,
            data,
            key,
        })
    }
}

/// Whose subscriptions a `ListSubscriptions` lists.
#[derive(Debug, PartialEq)]
pub enum SubscriptionsOf {
    Topic(String),
    Connection(ConnectionId),
}

/// A `ListSubscriptions`.
#[derive(Debug, PartialEq)]
pub struct SubscriptionQuery {
    pub tenant_id: TenantId,
    pub of: SubscriptionsOf,
    pub page_size: usize,
    /// The last item of the previous page (a connection id, or a topic).
    pub after: Option<String>,
}

impl SubscriptionQuery {
    /// The listing its page tokens belong to.
    pub fn scope(&self) -> String {
        match &self.of {
            SubscriptionsOf::Topic(topic) => {
                format!("subscribers\n{}\n{topic}", self.tenant_id)
            }
            SubscriptionsOf::Connection(id) => {
                format!("subscriptions\n{}\n{id}", self.tenant_id)
            }
        }
    }
}

impl TryFrom<v1::ListSubscriptionsRequest> for SubscriptionQuery {
    type Error = ConnectionError;
    fn try_from(r: v1::ListSubscriptionsRequest) -> Result<Self, Self::Error> {
        use v1::list_subscriptions_request::Selector;
        let page = r.page.unwrap_or_default();
        let of = match r.selector {
            Some(Selector::Topic(topic)) => SubscriptionsOf::Topic(required_topic("topic", topic)?),
            Some(Selector::ConnectionId(id)) => {
                SubscriptionsOf::Connection(required_id("connection_id", id)?)
            }
            None => {
                return Err(ConnectionError::invalid(
                    "selector",
                    "is required: set one of `topic` or `connection_id`",
                ));
            }
        };
        let mut query = Self {
            tenant_id: required_id("tenant_id", r.tenant_id)?,
            of,
            page_size: page_size(page.page_size)?,
            after: None,
        };
        query.after = page_token::read(&query.scope(), &page.page_token)?;
        Ok(query)
    }
}

/// Page tokens: opaque to callers. A token holds the last item of its page
/// and the listing it belongs to (tenant, and user, topic or connection),
/// base64url-encoded; it is refused, INVALID_ARGUMENT, in another listing
/// or when this service did not issue it. Not a secret, and not signed: a
/// forged one can only start a listing the caller may read anyway at
/// another place.
pub mod page_token {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use crate::error::ConnectionError;

    const VERSION: &str = "1";

    /// The token of the page after `last`, in the listing `scope`.
    pub fn after(scope: &str, last: &str) -> String {
        URL_SAFE_NO_PAD.encode(format!("{VERSION}\n{last}\n{scope}"))
    }

    /// The last item of the previous page, from a token of the listing
    /// `scope` (empty: the first page).
    pub fn read(scope: &str, token: &str) -> Result<Option<String>, ConnectionError> {
        if token.is_empty() {
            return Ok(None);
        }
        let refused = || {
            ConnectionError::invalid(
                "page.page_token",
                "is not a token of this listing: pass the previous page's `next_page_token` \
                 unchanged, with the same tenant and filters",
            )
        };
        let text = URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(refused)?;
        // Items and ids hold no control characters, so the newlines
        // separate the parts unambiguously.
        match text.splitn(3, '\n').collect::<Vec<_>>()[..] {
            [VERSION, last, listing] if listing == scope && !last.is_empty() => {
                Ok(Some(last.to_owned()))
            }
            _ => Err(refused()),
        }
    }
}

/// A page's size from the wire: 0 is the default, past the largest is
/// refused.
fn page_size(asked: u32) -> Result<usize, ConnectionError> {
    match asked as usize {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => Err(ConnectionError::invalid(
            "page.page_size",
            format!("must be at most {MAX_PAGE_SIZE}"),
        )),
        n => Ok(n),
    }
}

#[derive(Debug, PartialEq)]
pub struct ListQuery {
    pub tenant_id: TenantId,
    pub user_id: Option<UserId>,
    pub page_size: usize,
    pub after: Option<ConnectionId>,
}

impl ListQuery {
    /// The listing its page tokens belong to.
    pub fn scope(&self) -> String {
        let user = self.user_id.as_ref().map_or("", |u| u.as_str());
        format!("connections\n{}\n{user}", self.tenant_id)
    }
}

impl TryFrom<v1::ListConnectionsRequest> for ListQuery {
    type Error = ConnectionError;
    fn try_from(r: v1::ListConnectionsRequest) -> Result<Self, Self::Error> {
        let page = r.page.unwrap_or_default();
        let mut query = Self {
            tenant_id: required_id("tenant_id", r.tenant_id)?,
            user_id: optional_id("user_id", r.user_id)?,
            page_size: page_size(page.page_size)?,
            after: None,
        };
        query.after = page_token::read(&query.scope(), &page.page_token)?
            .map(|last| optional_id("page.page_token", last))
            .transpose()?
            .flatten();
        Ok(query)
    }
}

#[derive(Debug)]
pub struct DisconnectCommand {
    pub connection_id: ConnectionId,
    pub reason: String,
    pub tenant_id: Option<TenantId>,
}

impl TryFrom<v1::DisconnectRequest> for DisconnectCommand {
    type Error = ConnectionError;
    fn try_from(r: v1::DisconnectRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            connection_id: required_id("connection_id", r.connection_id)?,
            reason: truncate_utf8(r.reason, MAX_CLOSE_REASON_BYTES),
            tenant_id: optional_id("tenant_id", r.tenant_id)?,
        })
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A record as the API shows it.
pub fn connection_to_proto(r: ConnectionRecord) -> v1::Connection {
    let expires_at = r.expires_at_ms();
    v1::Connection {
        identity: Some(v1::Identity {
            user_id: r.user_id.into(),
            tenant_id: r.tenant_id.into(),
            permissions: r.permissions,
            topics: r.topics,
        }),
        connection_id: r.connection_id.into(),
        edge_id: r.edge_id.into(),
        connected_at: Some(timestamp(r.connected_at_ms)),
        last_seen: Some(timestamp(r.last_seen_ms)),
        user_agent: r.user_agent,
        client_ip: r.client_ip,
        expires_at: Some(timestamp(expires_at)),
        apigateway: r.apigateway.map(|a| v1::ApiGatewayLocation {
            domain_name: a.domain_name,
            stage: a.stage,
        }),
    }
}

/// A record from what an edge announced. The edge is trusted for identity:
/// it only announces sockets whose token AuthService verified.
pub fn connection_from_edge(
    c: v1::Connection,
    edge_id: &EdgeId,
    now_ms: u64,
) -> Result<ConnectionRecord, ConnectionError> {
    let identity = c
        .identity
        .ok_or_else(|| ConnectionError::EdgeProtocol("connection without identity".into()))?;
    let ms = |t: Option<prost_types::Timestamp>| {
        t.map(|t| (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000)
    };
    let bad = |e: ConnectionError| ConnectionError::EdgeProtocol(e.to_string());
    Ok(ConnectionRecord {
        connection_id: required_id("connection_id", c.connection_id).map_err(bad)?,
        user_id: required_id("user_id", identity.user_id).map_err(bad)?,
        tenant_id: required_id("tenant_id", identity.tenant_id).map_err(bad)?,
        permissions: identity.permissions,
        topics: identity.topics,
        edge_id: edge_id.clone(),
        connected_at_ms: ms(c.connected_at).unwrap_or(now_ms),
        last_seen_ms: ms(c.last_seen).unwrap_or(now_ms).max(now_ms),
        user_agent: c.user_agent,
        client_ip: c.client_ip,
        apigateway: c
            .apigateway
            .map(|a| -> Result<ApiGatewayConnection, ConnectionError> {
                if a.domain_name.is_empty() || a.stage.is_empty() {
                    return Err(ConnectionError::EdgeProtocol(
                        "an API Gateway location needs its domain name and stage".into(),
                    ));
                }
                Ok(ApiGatewayConnection {
                    domain_name: a.domain_name,
                    stage: a.stage,
                })
            })
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_tokens_are_opaque_and_read_only_in_their_own_listing() {
        let token = page_token::after("connections\nacme\n", "c-42");
        assert!(!token.contains("c-42"), "{token}");
        assert_eq!(
            page_token::read("connections\nacme\n", &token).unwrap(),
            Some("c-42".to_owned())
        );
        assert_eq!(page_token::read("connections\nacme\n", "").unwrap(), None);
        let foreign = [
            // Another tenant's listing, another user's, garbage, a raw id.
            page_token::read("connections\nglobex\n", &token),
            page_token::read("connections\nacme\nalice", &token),
            page_token::read("connections\nacme\n", "!!not base64!!"),
            page_token::read("connections\nacme\n", "c-42"),
            page_token::read(
                "connections\nacme\n",
                &page_token::after("connections\nacme\n", ""),
            ),
        ];
        for refused in foreign {
            let error = refused.unwrap_err().to_string();
            assert!(error.contains("page.page_token"), "{error}");
        }
    }

    #[test]
    fn an_unset_value_anywhere_in_a_json_payload_is_refused() {
        let unset = prost_types::Value { kind: None };
        let nested = streamer_api::json::to_proto(serde_json::json!({"a": [1, 2]}));
        let mut nested_unset = nested.clone();
        if let Some(prost_types::value::Kind::StructValue(s)) = &mut nested_unset.kind {
            s.fields.insert("b".into(), unset.clone());
        }
        for value in [unset, nested_unset] {
            let error = required_payload(Some(v1::Payload {
                body: Some(v1::payload::Body::Json(value)),
            }))
            .unwrap_err()
            .to_string();
            assert!(error.contains("payload.json"), "{error}");
            assert!(error.contains("no kind set"), "{error}");
        }
        assert!(
            required_payload(Some(v1::Payload {
                body: Some(v1::payload::Body::Json(nested)),
            }))
            .is_ok()
        );
    }

    use super::*;

    fn payload() -> Option<v1::Payload> {
        Some(v1::Payload {
            body: Some(v1::payload::Body::Text("hi".into())),
        })
    }

    #[test]
    fn send_requires_id_and_payload() {
        let err = SendCommand::try_from(v1::SendRequest {
            connection_id: String::new(),
            payload: payload(),
            tenant_id: String::new(),
            sequence: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("connection_id"), "{err}");
        let err = SendCommand::try_from(v1::SendRequest {
            connection_id: "c1".into(),
            payload: Some(v1::Payload { body: None }),
            tenant_id: String::new(),
            sequence: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("payload"), "{err}");
        let err = SendCommand::try_from(v1::SendRequest {
            connection_id: "c1".into(),
            payload: payload(),
            tenant_id: String::new(),
            sequence: Some(v1::Sequence {
                stream: String::new(),
                number: 1,
            }),
        })
        .unwrap_err();
        assert!(err.to_string().contains("sequence.stream"), "{err}");
    }

    #[test]
    fn ids_with_nul_or_too_long_are_refused() {
        assert!(required_id::<ConnectionId>("x", "a\0b".into()).is_err());
        assert!(required_id::<ConnectionId>("x", "a".repeat(MAX_ID_BYTES + 1)).is_err());
        assert_eq!(required_id::<ConnectionId>("x", "ok".into()).unwrap(), "ok");
    }

    #[test]
    fn broadcast_dedups_ids_and_requires_a_target() {
        let cmd = BroadcastCommand::try_from(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Connections(
                v1::ConnectionIds {
                    ids: vec!["a".into(), "b".into(), "a".into()],
                },
            )),
            payload: payload(),
            tenant_id: String::new(),
        })
        .unwrap();
        assert_eq!(
            cmd.target,
            BroadcastTarget::Connections(vec!["a".into(), "b".into()])
        );
        assert!(
            BroadcastCommand::try_from(v1::BroadcastRequest {
                target: None,
                payload: payload(),
                tenant_id: String::new(),
            })
            .is_err()
        );
    }

    #[test]
    fn page_size_is_bounded() {
        let query = |size| {
            ListQuery::try_from(v1::ListConnectionsRequest {
                tenant_id: "t".into(),
                user_id: String::new(),
                page: Some(v1::PageRequest {
                    page_size: size,
                    page_token: String::new(),
                }),
            })
        };
        assert_eq!(query(0).unwrap().page_size, DEFAULT_PAGE_SIZE);
        assert_eq!(query(5).unwrap().page_size, 5);
        assert!(query(MAX_PAGE_SIZE as u32 + 1).is_err());
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let cut = truncate_utf8(reason, MAX_CLOSE_REASON_BYTES);
        assert!(cut.len() <= MAX_CLOSE_REASON_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    proptest::proptest! {
        /// Whatever a caller sends, the conversion refuses it with a field
        /// named or yields ids the store can index: never a panic.
        #[test]
        fn any_send_or_broadcast_is_refused_or_well_formed(
            connection_id in "(\\PC|\\x00){0,300}",
            tenant_id in "(\\PC|\\x00){0,300}",
            ids in proptest::collection::vec("(\\PC|\\x00){0,20}", 0..20),
        ) {
            let valid = |id: &str| !id.is_empty() && streamer_core::ids::unusable(id).is_none();
            match SendCommand::try_from(v1::SendRequest {
                connection_id: connection_id.clone(),
                payload: payload(),
                tenant_id: tenant_id.clone(),
                sequence: None,
            }) {
                Ok(cmd) => {
                    proptest::prop_assert!(valid(cmd.connection_id.as_str()));
                    proptest::prop_assert!(cmd.tenant_id.as_ref().map(TenantId::as_str).is_none_or(valid));
                }
                Err(error) => proptest::prop_assert!(error.to_string().contains('`')),
            }
            let broadcast = BroadcastCommand::try_from(v1::BroadcastRequest {
                target: Some(v1::broadcast_request::Target::Connections(v1::ConnectionIds { ids })),
                payload: payload(),
                tenant_id,
            });
            if let Ok(BroadcastCommand { target: BroadcastTarget::Connections(ids), .. }) = broadcast {
                proptest::prop_assert!(!ids.is_empty() && ids.iter().all(|id| valid(id.as_str())));
            }
        }
    }
}
