//! What one client may cost the edge, so that no client can hurt others.
//!
//! - Frames: at most `max_frame_bytes`, enforced by the WebSocket layer as
//!   the frame arrives (nothing larger is ever buffered); an oversized frame
//!   closes the socket with 1009, invalid UTF-8 with 1007, a protocol
//!   violation with 1002.
//! - Messages: a token bucket per socket (`message_rate` per second, bursts
//!   of `message_burst`). A frame over the rate is answered RATE_LIMITED
//!   and dropped; a client that goes on sending while refused, a whole
//!   burst's worth of refusals in a row, is closed with 1008.
//! - Idleness: the edge pings every `ping_interval`; a socket from which
//!   nothing (not even a pong) arrived for `idle_timeout` is closed with 1001.
//! - Connections: at most `max_connections` per edge, and at most
//!   `max_handshakes` being authenticated at once; past either, a new
//!   client gets 503 before anything is read from it, while health,
//!   metrics and the sockets already open keep working. New connections
//!   from one IP address are a token bucket too ([`PerIpRate`]); loopback
//!   is exempt (local load tests, sidecars).

use std::time::Duration;

use tokio::time::Instant;

/// The per-socket limits (see the module's opening comment).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SocketLimits {
    pub max_frame_bytes: usize,
    pub message_rate: f64,
    pub message_burst: u32,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
}

impl Default for SocketLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1024 * 1024,
            message_rate: 100.0,
            message_burst: 200,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
        }
    }
}

/// Close codes the edge uses, with their RFC 6455 meaning.
pub mod close {
    /// Going away: the server shuts down, or the socket was idle too long.
    pub const GOING_AWAY: u16 = 1001;
    /// A protocol violation.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy: a slow consumer, or a client that would not slow down.
    pub const POLICY: u16 = 1008;
    /// A frame larger than the limit.
    pub const TOO_BIG: u16 = 1009;
}

/// What to do with one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Within the rate.
    Accept,
    /// Over the rate: answer RATE_LIMITED and drop the frame.
    Refuse,
    /// Over the rate for a whole burst of refusals in a row: close (1008).
    Close,
}

/// A token bucket (of one socket's messages, or one address's new
/// connections), with the count of refusals since the last acceptance.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    refused_in_a_row: u32,
}

impl TokenBucket {
    /// A full bucket. A rate of 0 (or less) means no limit.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
            refused_in_a_row: 0,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        if self.rate <= 0.0 {
            return Admit::Accept;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            return Admit::Accept;
        }
        self.refused_in_a_row += 1;
        if f64::from(self.refused_in_a_row) > self.burst {
            Admit::Close
        } else {
            Admit::Refuse
        }
    }
}

/// Addresses remembered at once by [`PerIpRate`].
const MAX_TRACKED_ADDRESSES: usize = 65_536;

/// New connections per client IP address, each a [`TokenBucket`].
///
/// Bounded: when [`MAX_TRACKED_ADDRESSES`] are tracked, addresses not seen
/// for a minute are forgotten; if none is, new addresses are refused
/// until some are (an attacker with that many addresses is not slowed by a
/// per-address limit anyway, and those already known keep their buckets).
#[derive(Debug)]
pub struct PerIpRate {
    rate: f64,
    burst: u32,
    /// A std mutex: one lookup per new connection, never held across an
    /// await.
    buckets: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, TokenBucket>>,
}

impl PerIpRate {
    /// `rate` new connections per second per address, in bursts of
    /// `burst`; a rate of 0 means no limit.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst,
            buckets: std::sync::Mutex::default(),
        }
    }

    /// Whether a new connection from `ip` may proceed.
    pub fn admit(&self, ip: std::net::IpAddr, now: Instant) -> bool {
        if self.rate <= 0.0 || ip.is_loopback() {
            return true;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(&ip) && buckets.len() >= MAX_TRACKED_ADDRESSES {
            let stale = now.checked_sub(Duration::from_secs(60));
            buckets.retain(|_, b| stale.is_none_or(|stale| b.last > stale));
            if buckets.len() >= MAX_TRACKED_ADDRESSES {
                return false;
            }
        }
        buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            .admit(now)
            == Admit::Accept
    }
}

/// The close code that answers a failed read from a client, or `None`
/// when the connection itself is gone and nothing can be sent.
pub fn close_code_for(error: &axum::Error) -> Option<u16> {
    use tungstenite::Error;
    let source = std::error::Error::source(error)?;
    match source.downcast_ref::<Error>()? {
        Error::Capacity(_) => Some(close::TOO_BIG),
        Error::Utf8(_) => Some(close::INVALID_PAYLOAD),
        Error::Protocol(_) | Error::AttackAttempt => Some(close::PROTOCOL_ERROR),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_then_a_flood_is_closed() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5, start);
        for _ in 0..5 {
            assert_eq!(bucket.admit(start), Admit::Accept);
        }
        assert_eq!(bucket.admit(start), Admit::Refuse);
        // 100 ms at 10/s is one more message.
        let later = start + Duration::from_millis(100);
        assert_eq!(bucket.admit(later), Admit::Accept);
        assert_eq!(bucket.admit(later), Admit::Refuse);
        // A client that keeps sending while refused is closed after a
        // whole burst of refusals in a row.
        let mut last = Admit::Refuse;
        for _ in 0..5 {
            last = bucket.admit(later);
        }
        assert_eq!(last, Admit::Close);
    }

    #[test]
    fn a_client_that_slows_down_is_forgiven() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 2, start);
        bucket.admit(start);
        bucket.admit(start);
        assert_eq!(bucket.admit(start), Admit::Refuse);
        assert_eq!(bucket.admit(start), Admit::Refuse);
        let later = start + Duration::from_secs(1);
        assert_eq!(bucket.admit(later), Admit::Accept);
        // The refusals before were forgiven: two more refusals do not close.
        bucket.admit(later);
        assert_eq!(bucket.admit(later), Admit::Refuse);
        assert_eq!(bucket.admit(later), Admit::Refuse);
    }

    #[test]
    fn read_failures_map_to_their_close_codes() {
        use tungstenite::error::{CapacityError, ProtocolError};
        let code = |e: tungstenite::Error| close_code_for(&axum::Error::new(e));
        assert_eq!(
            code(tungstenite::Error::Capacity(
                CapacityError::MessageTooLong {
                    size: 2,
                    max_size: 1
                }
            )),
            Some(close::TOO_BIG)
        );
        assert_eq!(
            code(tungstenite::Error::Utf8("bad".into())),
            Some(close::INVALID_PAYLOAD)
        );
        assert_eq!(
            code(tungstenite::Error::Protocol(
                ProtocolError::UnmaskedFrameFromClient
            )),
            Some(close::PROTOCOL_ERROR)
        );
        assert_eq!(code(tungstenite::Error::ConnectionClosed), None);
    }

    #[test]
    fn new_connections_are_limited_per_address_and_loopback_is_exempt() {
        let now = Instant::now();
        let limit = PerIpRate::new(1.0, 3);
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limit.admit(a, now));
        }
        assert!(!limit.admit(a, now), "a's burst is spent");
        assert!(limit.admit(b, now), "b has its own bucket");
        assert!(limit.admit(a, now + Duration::from_secs(1)), "a refilled");
        let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..100 {
            assert!(limit.admit(local, now));
        }
    }

    #[test]
    fn rate_zero_means_no_limit() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(0.0, 1, now);
        for _ in 0..10_000 {
            assert_eq!(bucket.admit(now), Admit::Accept);
        }
    }
}
