//! Logs, traces and metrics, set up once per process.
//!
//! Logs are structured (`tracing`): plain lines, coloured, when they go to
//! a terminal, and one JSON object per line otherwise (a container's log
//! pipeline indexes the fields); either can be forced. Colour codes are
//! written only to a terminal. The filter comes from `STREAMER_LOG`
//! (falling back to `RUST_LOG`, then `info`); a line logged inside a traced
//! operation carries its `trace_id` and `span_id` (see [`crate::trace`] for
//! when spans are exported). Metrics are Prometheus text on
//! `GET /metrics` of a small HTTP listener; what they are is in
//! [`crate::metrics`].

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub use crate::trace::Traces;

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
/// `RUST_LOG`, else by `default_filter` (e.g. "info"); no traces. Safe to
/// call more than once (later calls do nothing), which keeps tests that
/// start several servers simple.
pub fn init_logs(format: LogFormat, default_filter: &str) {
    init_with(format, default_filter, &Traces::default());
}

/// Installs logs as [`init_logs`] does and, when the standard
/// `OTEL_EXPORTER_OTLP_*` variables ask for it, traces exported over OTLP
/// under the service name `service`. Must run inside the Tokio runtime; keep
/// the returned [`Traces`] and shut it down at exit, which flushes the last
/// spans.
pub fn init(format: LogFormat, default_filter: &str, service: &str) -> anyhow::Result<Traces> {
    let traces = Traces::from_env(service)?;
    init_with(format, default_filter, &traces);
    Ok(traces)
}

/// Installs logs as [`init_logs`] does, and the spans `traces` exports.
pub fn init_with(format: LogFormat, default_filter: &str, traces: &Traces) {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = std::env::var("STREAMER_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default_filter));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = subscriber(
        format.resolve(terminal),
        terminal,
        filter,
        traces.tracer(),
        std::io::stderr,
    )
    .try_init();
}

/// Log lines in `format` to `writer`, filtered by `filter`, and, given a
/// tracer, the product's spans.
fn subscriber<W>(
    format: LogFormat,
    ansi: bool,
    filter: EnvFilter,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    writer: W,
) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let logs = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    // The log formatter asks the dispatcher for a span's trace id, and is
    // part of that dispatcher: it gets a weak handle once both exist.
    let dispatch = Arc::new(OnceLock::new());
    let logs = match format {
        LogFormat::Json | LogFormat::Auto => logs
            .event_format(WithTraceIds {
                format: tracing_subscriber::fmt::format().json().flatten_event(true),
                json: true,
                dispatch: dispatch.clone(),
            })
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_filter(filter)
            .boxed(),
        LogFormat::Plain => logs
            .event_format(WithTraceIds {
                format: tracing_subscriber::fmt::format().compact(),
                json: false,
                dispatch: dispatch.clone(),
            })
            .with_filter(filter)
            .boxed(),
    };
    // The product's own spans (and its events, as span events), whatever
    // `STREAMER_LOG` says: the log filter governs only the log lines.
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("streamer", tracing::Level::INFO),
            )
    });
    let subscriber = tracing::Dispatch::new(tracing_subscriber::registry().with(spans).with(logs));
    let _ = dispatch.set(subscriber.downgrade());
    subscriber
}

/// Puts the `trace_id` and `span_id` of the innermost traced span around
/// an event into its log line: a top-level field of a JSON line, a prefix
/// of a plain one.
struct WithTraceIds<F> {
    format: F,
    json: bool,
    /// The dispatcher this formatter is part of (while formatting, the
    /// thread's default dispatcher is not reachable).
    dispatch: Arc<OnceLock<tracing::dispatcher::WeakDispatch>>,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = ctx
            .event_scope()
            .zip(self.dispatch.get().and_then(|weak| weak.upgrade()))
            .and_then(|(scope, dispatch)| {
                scope
                    .into_iter()
                    .find_map(|span| crate::trace::ids_of(&span.id(), &dispatch))
            });
        let Some((trace_id, span_id)) = ids else {
            return self.format.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "trace_id={trace_id} span_id={span_id} ")?;
            return self.format.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.format
            .format_event(ctx, Writer::new(&mut line), event)?;
        let rest = line.strip_prefix('{').unwrap_or(&line);
        write!(
            writer,
            "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
        )
    }
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

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, traced: bool) -> String {
        use opentelemetry::trace::TracerProvider as _;
        let lines = Lines::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = traced.then(|| provider.tracer("test"));
        let out = lines.clone();
        let subscriber = subscriber(format, false, EnvFilter::new("info"), tracer, move || {
            out.clone()
        });
        tracing::dispatcher::with_default(&subscriber, || {
            let parent: crate::trace::TraceContext = [(
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            )]
            .into();
            let span = tracing::info_span!("streamer.test", request_id = "r1");
            crate::trace::continue_from(&span, [crate::trace::from_map(&parent)]);
            span.in_scope(|| tracing::info!(answer = 42, "inside"));
            tracing::info!("outside");
        });
        String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_inside_a_traced_span_carry_its_trace_id() {
        let text = logged(LogFormat::Json, true);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "inside");
        assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(lines[0]["span_id"].as_str().unwrap().len(), 16);
        assert_ne!(lines[0]["span_id"], "00f067aa0ba902b7", "the span's own id");
        assert_eq!(lines[0]["answer"], 42);
        assert_eq!(lines[1]["message"], "outside");
        assert!(lines[1].get("trace_id").is_none(), "{text}");

        let plain = logged(LogFormat::Plain, true);
        let mut plain = plain.lines();
        assert!(
            plain
                .next()
                .unwrap()
                .starts_with("trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=")
        );
        assert!(!plain.next().unwrap().contains("trace_id"));
    }

    #[test]
    fn without_traces_lines_carry_no_trace_id() {
        let text = logged(LogFormat::Json, false);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains("trace_id"), "{text}");
    }

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
