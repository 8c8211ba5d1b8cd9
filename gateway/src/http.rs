//! The edge's HTTP server: hyper's, driven by our own accept loop so that a
//! client gets a deadline for its request headers.
//!
//! `axum::serve` sets no timer, so a client that sends half its headers is
//! held forever (slowloris). Here each connection's HTTP/1 side has a
//! header-read timeout: past it, hyper closes the connection; and a
//! connection that sends no byte at all within that time is closed before
//! hyper sees it. A failed
//! accept (out of descriptors, say) waits a moment instead of spinning,
//! and never stops the server.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

/// How long a failed accept waits before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `shutdown` resolves, then lets open
/// requests finish (upgraded sockets are the caller's to close) and
/// returns once every HTTP connection is done.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    (header_read_timeout, send_buffer): (Duration, Option<usize>),
    shutdown: impl Future<Output = ()>,
) {
    // Dropped to tell every connection to finish.
    let (stop, stopped) = watch::channel(());
    // Each connection holds a receiver; all dropped means all finished.
    let (done, finished) = watch::channel(());
    let mut make_service = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    metrics::counter!("streamer_gateway_accept_errors_total").increment(1);
                    tracing::warn!(%error, "accept failed; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        if let Some(bytes) = send_buffer
            && let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes)
        {
            tracing::warn!(%error, bytes, "cannot set the socket's send buffer");
        }
        // Always ready: it only pairs the router with the peer's address.
        let Ok(service) = Service::<SocketAddr>::call(&mut make_service, peer).await;
        let service = service.map_request(|request: http::Request<hyper::body::Incoming>| {
            request.map(axum::body::Body::new)
        });
        let service = TowerToHyperService::new(service);
        let mut stopped = stopped.clone();
        let finished = finished.clone();
        tokio::spawn(async move {
            // hyper's header timer starts only once the first bytes tell it
            // the HTTP version: a socket that sends nothing at all gets the
            // same deadline here.
            let mut first = [0u8; 1];
            let spoke = tokio::select! {
                peeked = tokio::time::timeout(header_read_timeout, stream.peek(&mut first)) => {
                    matches!(peeked, Ok(Ok(n)) if n > 0)
                }
                _ = stopped.changed() => false,
            };
            if !spoke {
                metrics::counter!("streamer_gateway_silent_connections_closed_total").increment(1);
                drop(finished);
                return;
            }
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "http connection ended");
                    }
                }
                _ = stopped.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(finished);
        });
    }
    drop(listener);
    drop(stop);
    drop(finished);
    done.closed().await;
}
