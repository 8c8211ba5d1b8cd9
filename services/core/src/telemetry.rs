//! Logs and metrics, set up once per process.
//!
//! Logs are structured (`tracing`): plain lines, coloured, when they go to
//! a terminal, and one JSON object per line otherwise (a container's log
//! pipeline indexes the fields); either can be forced. Colour codes are
//! written only to a terminal. The filter comes from `STREAMER_LOG`
//! (falling back to `RUST_LOG`, then `info`). Metrics are Prometheus text on
//! `GET /metrics` of a small HTTP listener; what they are is in
//! [`crate::metrics`].

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::shutdown::Shutdown;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable lines (coloured only on a terminal).
    Plain,
}

impl LogFormat {
    /// The format for logs written to a terminal or not.
    pub fn resolve(self, terminal: bool) -> LogFormat {
        match self {
            LogFormat::Auto if terminal => LogFormat::Plain,
            LogFormat::Auto => LogFormat::Json,
            chosen => chosen,
        }
    }
}

/// Installs the global log subscriber, filtered by `STREAMER_LOG` or
/// `RUST_LOG`, else by `default_filter` (e.g. "info"). Safe to call more
/// than once (later calls do nothing), which keeps tests that start several
/// servers simple.
pub fn init_logs(format: LogFormat, default_filter: &str) {
    let filter = std::env::var("STREAMER_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default_filter));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    let _ = match format.resolve(terminal) {
        LogFormat::Json | LogFormat::Auto => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.compact().try_init(),
    };
}

/// Installs the global Prometheus recorder (once per process) and returns
/// its handle. Every `_seconds` family is a histogram with
/// [`crate::metrics::DURATION_BUCKETS`].
pub fn metrics_recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    crate::metrics::DURATION_BUCKETS,
                )
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness);
            // then this handle simply renders nothing of it.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves `GET /metrics` (Prometheus text), `GET /healthz` (the process
/// answers) and `GET /readyz` (every gRPC server of the process reports
/// SERVING, as its gRPC health does) on `addr` until `shutdown`. The HTTP
/// pair is for probes that cannot speak gRPC over TLS, such as the
/// kubelet's. The process metrics (`process_*`) are read at each scrape.
pub async fn serve_metrics(addr: SocketAddr, shutdown: Shutdown) -> anyhow::Result<()> {
    let handle = metrics_recorder();
    let process = metrics_process::Collector::default();
    process.describe();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                process.collect();
                async move { handle.render() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(|| async {
                match crate::grpc::not_serving() {
                    none if none.is_empty() => (axum::http::StatusCode::OK, "ready".to_owned()),
                    some => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("not serving: {}", some.join(", ")),
                    ),
                }
            }),
        );
    let listener = crate::grpc::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "metrics listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_plain_on_a_terminal_and_json_elsewhere() {
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Plain);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        for forced in [LogFormat::Json, LogFormat::Plain] {
            assert_eq!(forced.resolve(true), forced);
            assert_eq!(forced.resolve(false), forced);
        }
    }
}
