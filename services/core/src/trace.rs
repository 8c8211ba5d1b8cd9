//! Traces: the product's `tracing` spans as OpenTelemetry spans, exported
//! over OTLP/gRPC when the standard variables ask for it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
//! and off otherwise.
//!
//! W3C Trace Context crosses every hop of a client request:
//! - a client frame's `metadata.traceparent` (and `tracestate`) is the
//!   parent of the edge's span;
//! - on unary gRPC calls it travels as `traceparent`/`tracestate` metadata
//!   ([`inject`], [`from_metadata`]);
//! - on the long-lived streams (the edge's Attach stream, a router's
//!   Receive, a processor's Claim), where gRPC metadata exists only once per
//!   stream, each message carries it in its `trace_context` map
//!   ([`current`], [`from_map`]); a request keeps the context it was
//!   accepted in, so a processor's later calls join the same trace even
//!   when the processor sends none.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A W3C Trace Context as the protos carry it (`trace_context` fields).
pub type TraceContext = HashMap<String, String>;

/// The W3C Trace Context of the current span; empty when no span is traced
/// (tracing off, or outside every span).
pub fn current() -> TraceContext {
    let mut carrier = TraceContext::new();
    inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier
}

/// The current span's context when it belongs to the same trace as
/// `stored` (or `stored` is empty), else `stored`: work done for something
/// accepted in one trace stays in that trace, even when the call that did
/// it came without a context of its own.
pub fn current_within(stored: &TraceContext) -> TraceContext {
    let here = tracing::Span::current().context();
    match from_map(stored) {
        Some(there)
            if there.span().span_context().trace_id() != here.span().span_context().trace_id() =>
        {
            stored.clone()
        }
        _ => current(),
    }
}

/// Puts the current span's W3C Trace Context into an outgoing call's
/// metadata (nothing when no span is traced).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    inject_context(
        &tracing::Span::current().context(),
        &mut MetadataInjector(metadata),
    );
}

/// An outgoing call's request with the current span's context in its
/// metadata.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    inject(request.metadata_mut());
    request
}

fn inject_context(cx: &Context, carrier: &mut dyn Injector) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, carrier);
    }
}

/// The remote parent carried in a `trace_context` map, if it holds a valid
/// one.
pub fn from_map(carrier: &TraceContext) -> Option<Context> {
    valid(TraceContextPropagator::new().extract(carrier))
}

/// The remote parent carried in an incoming call's metadata, if any.
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Context> {
    extract(|key| metadata.get(key)?.to_str().ok())
}

/// The remote parent a client put in its frame's `metadata` (string
/// `traceparent` and `tracestate` entries), if any.
pub fn from_client_metadata(
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> Option<Context> {
    extract(|key| metadata.get(key)?.as_str())
}

/// The remote parent an HTTP request carries in its `traceparent` (and
/// `tracestate`) headers, if any.
pub fn from_headers(headers: &http::HeaderMap) -> Option<Context> {
    extract(|key| headers.get(key)?.to_str().ok())
}

/// The same, from a frame's metadata as it crossed the Attach stream.
pub fn from_struct(metadata: Option<&prost_types::Struct>) -> Option<Context> {
    let metadata = metadata?;
    extract(|key| match metadata.fields.get(key)?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

/// The remote parent `get` finds under the W3C keys, read in place (no
/// copy of the carrier: this runs for every client frame).
fn extract<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Context> {
    valid(TraceContextPropagator::new().extract(&Lookup(get, std::marker::PhantomData)))
}

/// A carrier read through a lookup function (whose answers borrow from
/// something that outlives the carrier).
struct Lookup<'a, F>(F, std::marker::PhantomData<&'a ()>);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Lookup<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

fn valid(cx: Context) -> Option<Context> {
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` continue the trace of `parent`, the first of the given
/// carriers that holds one; a span without one starts a trace. Call it
/// before the span is first entered.
pub fn continue_from(span: &tracing::Span, parents: impl IntoIterator<Item = Option<Context>>) {
    if let Some(parent) = parents.into_iter().flatten().next() {
        // Fails only when tracing is off (no such span to parent).
        let _ = span.set_parent(parent);
    }
}

/// `span` as the server side of a gRPC call: a child of the caller's span
/// when the call's metadata carries one. Make it before the handler runs.
pub fn server_span<T>(request: &tonic::Request<T>, span: tracing::Span) -> tracing::Span {
    continue_from(&span, [from_metadata(request.metadata())]);
    span
}

/// The span `make` makes, as a child of the span that sent
/// `trace_context`; no span at all (and no cost) for work outside every
/// trace.
pub fn child_of(
    trace_context: &TraceContext,
    make: impl FnOnce() -> tracing::Span,
) -> tracing::Span {
    match from_map(trace_context) {
        Some(parent) => {
            let span = make();
            let _ = span.set_parent(parent);
            span
        }
        None => tracing::Span::none(),
    }
}

/// The trace and span ids of `span`, when it is traced, as lowercase hex:
/// what log lines carry.
pub(crate) fn ids_of(
    span: &tracing::span::Id,
    dispatch: &tracing::Dispatch,
) -> Option<(String, String)> {
    let cx = tracing_opentelemetry::get_otel_context(span, dispatch)?;
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| {
        (
            context.trace_id().to_string(),
            context.span_id().to_string(),
        )
    })
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::AsciiMetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Where traces go, read from the standard OpenTelemetry variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// No endpoint set, `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none`: no spans are made.
    Off,
    /// OTLP over gRPC; the exporter reads the endpoint, headers, timeout
    /// and compression from the `OTEL_EXPORTER_OTLP_*` variables itself.
    Otlp,
}

impl Export {
    /// Reads the choice from `var` (the environment, or a test's map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let var = |key: &str| var(key).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(Export::Off);
        }
        match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None | Some("otlp") => {}
            Some("none") => return Ok(Export::Off),
            Some(other) => anyhow::bail!(
                "OTEL_TRACES_EXPORTER={other}: Streamer exports traces with `otlp` (or `none`)"
            ),
        }
        if var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            return Ok(Export::Off);
        }
        for key in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = var(key)
                && protocol.trim() != "grpc"
            {
                anyhow::bail!(
                    "{key}={protocol}: Streamer exports traces over OTLP/gRPC only; set it to \
                     `grpc` and point the endpoint at the collector's gRPC port (4317 by default)"
                );
            }
        }
        Ok(Export::Otlp)
    }
}

/// The process's tracer provider; [`Traces::shutdown`] flushes what is
/// still buffered.
#[derive(Debug, Default)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Builds the exporter the environment asks for (must run inside the
    /// Tokio runtime: the gRPC exporter lives on it). `service` names the
    /// process unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`
    /// does.
    pub fn from_env(service: &str) -> anyhow::Result<Self> {
        match Export::from_vars(|key| std::env::var(key).ok())? {
            Export::Off => Ok(Traces::default()),
            Export::Otlp => {
                let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
                    || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                        .is_ok_and(|v| v.contains("service.name="));
                Self::export(
                    opentelemetry_otlp::SpanExporter::builder().with_tonic(),
                    (!named).then_some(service),
                )
            }
        }
    }

    /// Exports to the OTLP/gRPC collector at `endpoint` (`http://host:port`)
    /// under the service name `service`, whatever the environment says.
    pub fn otlp(endpoint: &str, service: &str) -> anyhow::Result<Self> {
        use opentelemetry_otlp::WithExportConfig as _;
        Self::export(
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint),
            Some(service),
        )
    }

    fn export(
        exporter: opentelemetry_otlp::SpanExporterBuilder<
            opentelemetry_otlp::TonicExporterBuilderSet,
        >,
        service: Option<&str>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let exporter = exporter
            .build()
            .context("cannot set up the OTLP trace exporter")?;
        let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        );
        if let Some(service) = service {
            resource = resource.with_service_name(service.to_owned());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Traces {
            provider: Some(provider),
        })
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    pub(crate) fn tracer(&self) -> Option<opentelemetry_sdk::trace::SdkTracer> {
        use opentelemetry::trace::TracerProvider as _;
        self.provider
            .as_ref()
            .map(|provider| provider.tracer("streamer"))
    }

    /// Exports every span ended so far.
    pub async fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "traces not flushed");
            }
        }
    }

    /// Exports every span still buffered, then stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "traces not flushed at shutdown");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |key| map.get(key).cloned()
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        assert_eq!(Export::from_vars(vars(&[])).unwrap(), Export::Off);
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert_eq!(Export::from_vars(vars(&[endpoint])).unwrap(), Export::Otlp);
        assert_eq!(
            Export::from_vars(vars(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://collector:4317"
            )]))
            .unwrap(),
            Export::Otlp
        );
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(
                Export::from_vars(vars(&[endpoint, off])).unwrap(),
                Export::Off
            );
        }
    }

    #[test]
    fn an_unsupported_protocol_or_exporter_is_refused_with_the_fix() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let error = Export::from_vars(vars(&[
            endpoint,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(error.contains("OTLP/gRPC only"), "{error}");
        let error = Export::from_vars(vars(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("zipkin"), "{error}");
        assert_eq!(
            Export::from_vars(vars(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])).unwrap(),
            Export::Otlp
        );
    }

    #[test]
    fn contexts_cross_metadata_maps_and_client_frames_intact() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("traceparent", traceparent.parse().unwrap());
        let from_grpc = from_metadata(&metadata).expect("a parent");
        let mut map = TraceContext::new();
        TraceContextPropagator::new().inject_context(&from_grpc, &mut map);
        assert_eq!(map["traceparent"], traceparent);
        assert!(from_map(&map).is_some());

        let client: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({"traceparent": traceparent, "x": 1}))
                .unwrap();
        let parent = from_client_metadata(&client).expect("a parent");
        assert_eq!(
            parent.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(parent.span().span_context().is_remote());
    }

    /// Runs `f` with spans exported nowhere but made (a tracer, no exporter).
    fn traced<R>(f: impl FnOnce() -> R) -> R {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    fn trace_of(context: &TraceContext) -> &str {
        context["traceparent"].split('-').nth(1).unwrap()
    }

    #[test]
    fn work_for_a_request_stays_in_the_trace_it_was_accepted_in() {
        let accepted: TraceContext = [(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]
        .into();
        traced(|| {
            // A call that came with the request's own context: its span.
            let span = tracing::info_span!("streamer.passed_on");
            continue_from(&span, [from_map(&accepted)]);
            let passed_on = span.in_scope(|| current_within(&accepted));
            assert_eq!(trace_of(&passed_on), trace_of(&accepted));
            assert_ne!(passed_on, accepted, "the call's own span is the parent");

            // A call that came without one: the request's trace, not the
            // call's fresh one.
            let span = tracing::info_span!("streamer.bare");
            let bare = span.in_scope(|| current_within(&accepted));
            assert_eq!(bare, accepted);
            assert_ne!(
                trace_of(&span.in_scope(current)),
                trace_of(&accepted),
                "the bare call has a trace of its own"
            );

            // A request accepted while tracing was off: the call's own.
            let untraced = span.in_scope(|| current_within(&TraceContext::new()));
            assert_eq!(untraced, span.in_scope(current));
        });
        // Tracing off: nothing to carry on but what was stored.
        assert!(current().is_empty());
        assert_eq!(current_within(&accepted), accepted);
    }

    #[test]
    fn a_span_without_a_traced_parent_is_none() {
        let none = child_of(&TraceContext::new(), || tracing::info_span!("streamer.x"));
        assert!(none.is_none());
    }

    #[test]
    fn malformed_or_absent_contexts_are_no_parent() {
        assert!(from_map(&TraceContext::new()).is_none());
        let bad: TraceContext = [("traceparent".to_owned(), "00-zz-00-01".to_owned())].into();
        assert!(from_map(&bad).is_none());
        let all_zero: TraceContext = [(
            "traceparent".to_owned(),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
        )]
        .into();
        assert!(from_map(&all_zero).is_none());
        let not_a_string: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({"traceparent": 7})).unwrap();
        assert!(from_client_metadata(&not_a_string).is_none());
        assert!(from_struct(None).is_none());
    }
}
