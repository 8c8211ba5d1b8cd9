//! A TCP proxy whose upstream direction can be held: bytes from the client
//! side wait (unread) while held, bytes the other way always flow. Put
//! between the edge and ConnectionService, it makes the edge slow to report
//! without touching either: commands still arrive and are carried out, but
//! what the edge says back arrives late.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct HoldingProxy {
    pub addr: SocketAddr,
    held: watch::Sender<bool>,
    downstream_bytes: Arc<AtomicU64>,
}

impl HoldingProxy {
    /// Listens on an ephemeral port and forwards every connection to
    /// `target`, until the test ends.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held, _) = watch::channel(false);
        let downstream_bytes = Arc::new(AtomicU64::new(0));
        let (gate, bytes) = (held.clone(), downstream_bytes.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(
                    client_read,
                    server_write,
                    Some(gate.subscribe()),
                    None,
                ));
                tokio::spawn(pump(server_read, client_write, None, Some(bytes.clone())));
            }
        });
        Self {
            addr,
            held,
            downstream_bytes,
        }
    }

    /// From now on, nothing more goes upstream until [`Self::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Bytes carried downstream (towards the client side) so far.
    pub fn downstream_bytes(&self) -> u64 {
        self.downstream_bytes.load(Ordering::SeqCst)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: Option<watch::Receiver<bool>>,
    count: Option<Arc<AtomicU64>>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if let Some(gate) = gate.as_mut()
            && gate.wait_for(|held| !held).await.is_err()
        {
            return;
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Read while open, but not forwarded until released: a hold that
        // starts mid-read still holds what was read.
        if let Some(gate) = gate.as_mut()
            && gate.wait_for(|held| !held).await.is_err()
        {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
        if let Some(count) = &count {
            count.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}
