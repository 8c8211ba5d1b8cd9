//! At most once and in order, per socket: the last sequence number written
//! to one socket for each of its ordered message streams.
//!
//! A message with a [`Sequence`](streamer_api::v1::Sequence) (every
//! message ProgressService sends about a request) is written to a socket
//! only when its number is greater than the last one written there for the
//! same stream. A retry of something already written is dropped, and so is
//! a late message that a newer one has overtaken.
//!
//! Why duplicates are dropped here, at the edge, and not in ConnectionService
//! or in ProgressService's outbox: a sender retries when it *does not know*
//! whether a delivery happened (the edge's report was slow, the stream
//! dropped, ConnectionService restarted; soon, another replica carries the
//! retry). Only the edge knows what was written to the socket, it outlives
//! every hop a retry can take, and its memory of a socket ends exactly when
//! the socket does, which is the scope of the promise. A sender's guess can
//! only be "maybe", so the senders retry with the same identity and the
//! edge decides.
//!
//! Bounded: a socket remembers its [`MAX_STREAMS`] most recently written
//! streams. A client with more requests in flight at once than that could,
//! in principle, see a retry of the oldest again; forgetting is counted
//! (`streamer_gateway_sequence_streams_forgotten_total`) so it is visible.
//! Idle sockets cost nothing: the window allocates on its first entry.

use std::collections::VecDeque;

/// Streams remembered per socket.
pub const MAX_STREAMS: usize = 64;

/// Whether a sequenced message may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New to this socket: write it (it is now recorded as written).
    Write,
    /// Written already, or overtaken by a newer message: drop it.
    Drop,
}

/// One socket's streams, the most recently written last.
#[derive(Debug, Default)]
pub struct SequenceWindow {
    streams: VecDeque<(Box<str>, u64)>,
}

impl SequenceWindow {
    /// Decides on `number` of `stream` and, when it is to be written,
    /// records it. The caller writes the message under the same lock, so
    /// two deliveries racing cannot both be admitted.
    pub fn admit(&mut self, stream: &str, number: u64) -> Admission {
        let name: Box<str> = match self.streams.iter().position(|(s, _)| &**s == stream) {
            Some(index) => {
                if number <= self.streams[index].1 {
                    return Admission::Drop;
                }
                self.streams
                    .remove(index)
                    .map_or_else(|| stream.into(), |(name, _)| name)
            }
            None => {
                if self.streams.len() >= MAX_STREAMS {
                    self.streams.pop_front();
                    metrics::counter!("streamer_gateway_sequence_streams_forgotten_total")
                        .increment(1);
                }
                stream.into()
            }
        };
        self.streams.push_back((name, number));
        Admission::Write
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_number_is_admitted_once_and_only_in_increasing_order() {
        let mut window = SequenceWindow::default();
        assert_eq!(window.admit("r1", 0), Admission::Write);
        assert_eq!(window.admit("r1", 0), Admission::Drop, "a retry");
        assert_eq!(window.admit("r1", 3), Admission::Write);
        assert_eq!(window.admit("r1", 2), Admission::Drop, "overtaken");
        assert_eq!(window.admit("r1", 3), Admission::Drop, "a retry");
        assert_eq!(window.admit("r1", 4), Admission::Write);
    }

    #[test]
    fn streams_are_independent() {
        let mut window = SequenceWindow::default();
        assert_eq!(window.admit("r1", 5), Admission::Write);
        assert_eq!(window.admit("r2", 0), Admission::Write);
        assert_eq!(window.admit("r2", 1), Admission::Write);
        assert_eq!(window.admit("r1", 5), Admission::Drop);
    }

    #[test]
    fn the_window_is_bounded_and_forgets_the_stream_written_longest_ago() {
        let mut window = SequenceWindow::default();
        for i in 0..MAX_STREAMS {
            assert_eq!(window.admit(&format!("r{i}"), 1), Admission::Write);
        }
        // r0 is written again, so r1 is now the oldest.
        assert_eq!(window.admit("r0", 2), Admission::Write);
        assert_eq!(window.admit("new", 0), Admission::Write);
        assert_eq!(window.len(), MAX_STREAMS);
        assert_eq!(window.admit("r0", 2), Admission::Drop, "r0 is remembered");
        assert_eq!(window.admit("r1", 1), Admission::Write, "r1 was forgotten");
    }

    #[test]
    fn a_dropped_message_does_not_refresh_its_stream() {
        let mut window = SequenceWindow::default();
        for i in 0..MAX_STREAMS {
            window.admit(&format!("r{i}"), 1);
        }
        // A duplicate of r0 changes nothing: r0 stays the oldest.
        assert_eq!(window.admit("r0", 1), Admission::Drop);
        window.admit("new", 0);
        assert_eq!(window.admit("r0", 1), Admission::Write, "r0 was forgotten");
    }
}
