//! A lean WebSocket subscriber for `versus-nchan`: raw TCP, a hand-written
//! client handshake, and a reader that parses frame headers only.
//!
//! The client shares two cores with the server it measures, so it does as
//! little as it can: it never looks inside a message. What it knows of each
//! one is its place in the socket's order and its length: the k-th message
//! of the benchmark's length is the k-th measured publish, and any other
//! length is a warm-up. Each read takes one timestamp for every message it
//! completes, and each message costs two atomic operations on the slot of
//! its publish (a count, and the latest arrival; the first subscriber to
//! count also notes its arrival). Pings are answered with a pong, as a
//! browser would; a close frame or the end of the stream ends the
//! subscriber.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::now_us;

/// Most bytes of a handshake response this client reads.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Upgrades a fresh TCP connection to `target` (path and query) on `addr`.
/// Returns the socket and whatever the server sent after its response head
/// (the start of the first frames, if any).
pub(crate) async fn connect(
    addr: SocketAddr,
    target: &str,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let key = generate_key();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let (head, rest) = read_head(&mut stream, Vec::with_capacity(512)).await?;
    let head = std::str::from_utf8(&head).context("response head is not UTF-8")?;
    let status = status_code(head)?;
    if status != 101 {
        bail!("upgrade refused: HTTP {status}");
    }
    let accept = header(head, "sec-websocket-accept").context("no Sec-WebSocket-Accept")?;
    if accept != derive_accept_key(key.as_bytes()) {
        bail!("wrong Sec-WebSocket-Accept");
    }
    Ok((stream, rest))
}

/// Reads until the end of an HTTP response head. `buffered` holds bytes
/// already read; returns the head (its blank line included) and the bytes
/// read past it.
pub(crate) async fn read_head(
    stream: &mut TcpStream,
    mut buffered: Vec<u8>,
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut scanned = 0usize;
    loop {
        if let Some(at) = buffered[scanned.saturating_sub(3)..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            let end = scanned.saturating_sub(3) + at + 4;
            let rest = buffered.split_off(end);
            return Ok((buffered, rest));
        }
        scanned = buffered.len();
        if scanned > MAX_RESPONSE_HEAD {
            bail!("response head over {MAX_RESPONSE_HEAD} bytes");
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head ended");
        }
        buffered.extend_from_slice(&chunk[..n]);
    }
}

/// The status code of a response head.
pub(crate) fn status_code(head: &str) -> anyhow::Result<u16> {
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status code in the response")
}

/// The value of the first header called `name` (lowercase), trimmed.
pub(crate) fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

// ---- what the subscribers saw ---------------------------------------------

/// One measured publish, as the subscribers of a set received it.
#[derive(Default)]
pub(crate) struct Slot {
    /// Subscribers that have it.
    received: AtomicUsize,
    /// The latest receipt, in `now_us` microseconds.
    last_us: AtomicU64,
    /// The receipt of the subscriber that counted first.
    first_us: AtomicU64,
}

/// What a set of subscribers received, shared by their readers and the
/// publisher that waits on them.
pub(crate) struct Tally {
    /// The length of a measured message; any other is a warm-up.
    message_len: u64,
    /// How many subscribers each slot waits for: those connected.
    sockets: AtomicUsize,
    /// Subscribers that have seen a warm-up message.
    warmed: AtomicUsize,
    slots: Box<[Slot]>,
    /// Measured messages beyond the slots: never expected.
    unexpected: AtomicU64,
    /// Subscribers whose socket the server closed or lost.
    ended: AtomicUsize,
    /// Told whenever a slot, or the warm-up, may be complete.
    changed: Notify,
}

impl Tally {
    pub(crate) fn new(publishes: usize, message_len: usize) -> Self {
        Self {
            message_len: message_len as u64,
            sockets: AtomicUsize::new(usize::MAX),
            warmed: AtomicUsize::new(0),
            slots: (0..publishes).map(|_| Slot::default()).collect(),
            unexpected: AtomicU64::new(0),
            ended: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    /// Sets how many subscribers are connected (once, before publishing).
    pub(crate) fn expect(&self, sockets: usize) {
        self.sockets.store(sockets, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, slot: usize) -> usize {
        self.slots[slot].received.load(Ordering::Relaxed)
    }

    /// When the last subscriber so far received the publish of `slot`.
    pub(crate) fn last_us(&self, slot: usize) -> u64 {
        self.slots[slot].last_us.load(Ordering::Relaxed)
    }

    /// When the first subscriber received the publish of `slot`.
    pub(crate) fn first_us(&self, slot: usize) -> u64 {
        self.slots[slot].first_us.load(Ordering::Relaxed)
    }

    pub(crate) fn warmed(&self) -> usize {
        self.warmed.load(Ordering::Relaxed)
    }

    pub(crate) fn unexpected(&self) -> u64 {
        self.unexpected.load(Ordering::Relaxed)
    }

    pub(crate) fn ended(&self) -> usize {
        self.ended.load(Ordering::Relaxed)
    }

    /// Waits until `done` holds, or `deadline`; whether it holds.
    pub(crate) async fn wait_until(&self, deadline: Instant, done: impl Fn(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Woken by the reader that completes a slot; the short timeout
            // only bounds the cost of a wake-up that raced the check.
            let nap = (deadline - now).min(Duration::from_millis(100));
            let _ = tokio::time::timeout(nap, self.changed.notified()).await;
        }
    }

    fn count(&self, len: u64, measured: &mut usize, warmed: &mut bool, at_us: u64) {
        let sockets = self.sockets.load(Ordering::Relaxed);
        if len != self.message_len {
            if !*warmed {
                *warmed = true;
                if self.warmed.fetch_add(1, Ordering::Relaxed) + 1 >= sockets {
                    self.changed.notify_one();
                }
            }
            return;
        }
        let Some(slot) = self.slots.get(*measured) else {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        *measured += 1;
        slot.last_us.fetch_max(at_us, Ordering::Relaxed);
        let before = slot.received.fetch_add(1, Ordering::Relaxed);
        if before == 0 {
            slot.first_us.store(at_us, Ordering::Relaxed);
        }
        if before + 1 >= sockets {
            self.changed.notify_one();
        }
    }
}

// ---- frames ---------------------------------------------------------------

/// What the header-only parser found in the bytes it was fed.
enum Event {
    /// A data message ended (its FIN frame): its length in bytes.
    Message(u64),
    /// A ping, with its payload (at most 125 bytes).
    Ping(Vec<u8>),
    /// A close frame.
    Close,
}

const OP_CONTINUATION: u8 = 0x0;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// Parses server frames as their bytes arrive, in any split: it keeps up
/// to a whole header, then skips the payload, except a ping's (echoed in
/// the pong).
#[derive(Default)]
struct FrameReader {
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to skip (or collect).
    left: u64,
    opcode: u8,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// A message's length over its fragments so far.
    message_len: u64,
    /// A control frame's payload, as it arrives.
    control: Vec<u8>,
    /// Inside a frame's payload (the header is complete).
    in_payload: bool,
}

impl FrameReader {
    /// The header's length once its first two bytes are known.
    fn header_len(&self) -> usize {
        let masked = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + extended + masked
    }

    fn feed(&mut self, mut bytes: &[u8], mut on: impl FnMut(Event)) {
        while !bytes.is_empty() {
            if !self.in_payload {
                let want = if self.have < 2 { 2 } else { self.header_len() };
                let take = (want - self.have).min(bytes.len());
                self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                self.have += take;
                bytes = &bytes[take..];
                if self.have < 2 || self.have < self.header_len() {
                    continue;
                }
                self.start_payload();
                if self.left == 0 {
                    self.end_frame(&mut on);
                }
                continue;
            }
            let take = usize::try_from(self.left)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            if self.opcode >= OP_CLOSE {
                self.control.extend_from_slice(&bytes[..take]);
            }
            self.left -= take as u64;
            bytes = &bytes[take..];
            if self.left == 0 {
                self.end_frame(&mut on);
            }
        }
    }

    fn start_payload(&mut self) {
        let h = &self.header;
        self.fin = h[0] & 0x80 != 0;
        self.opcode = h[0] & 0x0f;
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                10,
            ),
            short => (u64::from(short), 2),
        };
        self.mask = (h[1] & 0x80 != 0).then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        self.left = len;
        if self.opcode < OP_CLOSE {
            if self.opcode != OP_CONTINUATION && self.message_len != 0 {
                // A new message where a fragment was expected: start over.
                self.message_len = 0;
            }
            self.message_len += len;
        }
        self.control.clear();
        self.in_payload = true;
    }

    fn end_frame(&mut self, on: &mut impl FnMut(Event)) {
        self.in_payload = false;
        self.have = 0;
        match self.opcode {
            OP_PING => {
                let mut payload = std::mem::take(&mut self.control);
                if let Some(mask) = self.mask {
                    for (i, b) in payload.iter_mut().enumerate() {
                        *b ^= mask[i % 4];
                    }
                }
                on(Event::Ping(payload));
            }
            OP_CLOSE => on(Event::Close),
            op if op < OP_CLOSE && self.fin => {
                on(Event::Message(self.message_len));
                self.message_len = 0;
            }
            _ => {}
        }
    }
}

/// A masked pong carrying `payload`, as a client must send it.
fn pong(payload: &[u8]) -> Vec<u8> {
    let mask = (now_us() as u32).to_be_bytes();
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | 0xA);
    frame.push(0x80 | payload.len().min(125) as u8);
    frame.extend_from_slice(&mask);
    frame.extend(
        payload
            .iter()
            .take(125)
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4]),
    );
    frame
}

/// One subscriber's reading state.
#[derive(Default)]
struct Reader {
    frames: FrameReader,
    /// Measured messages so far: the next one is the publish of this slot.
    measured: usize,
    warmed: bool,
    pongs: Vec<Vec<u8>>,
    closed: bool,
}

impl Reader {
    fn take(&mut self, bytes: &[u8], at_us: u64, tally: &Tally) {
        let Self {
            frames,
            measured,
            warmed,
            pongs,
            closed,
        } = self;
        frames.feed(bytes, |event| match event {
            Event::Message(len) => tally.count(len, measured, warmed, at_us),
            Event::Ping(payload) => pongs.push(pong(&payload)),
            Event::Close => *closed = true,
        });
    }

    /// Writes the pongs owed; false when the socket is done.
    async fn answer(&mut self, stream: &mut TcpStream) -> bool {
        for frame in self.pongs.drain(..) {
            if stream.write_all(&frame).await.is_err() {
                self.closed = true;
            }
        }
        !self.closed
    }
}

/// Reads one subscriber's socket until the server ends it (or the task is
/// aborted, which closes the socket), counting its messages in `tally`.
/// `first` holds bytes that came with the handshake response.
pub(crate) async fn subscribe(mut stream: TcpStream, first: Vec<u8>, tally: std::sync::Arc<Tally>) {
    let mut reader = Reader::default();
    reader.take(&first, now_us(), &tally);
    drop(first);
    let mut buf = [0u8; 2048];
    while reader.answer(&mut stream).await {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => reader.take(&buf[..n], now_us(), &tally),
        }
    }
    tally.ended.fetch_add(1, Ordering::Relaxed);
    tally.changed.notify_one();
}
