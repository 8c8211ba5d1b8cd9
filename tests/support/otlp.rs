//! An OTLP/gRPC trace receiver for tests: a real collector's trace service
//! on an ephemeral port, keeping every span it is sent.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;

/// A span as the receiver got it: ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
}

/// An OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
pub struct Receiver(Arc<Mutex<Vec<Span>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(a.value.as_ref()))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(a.value.as_ref())))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    pub async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// The spans of one trace, looked up by name and parent.
pub struct Trace(pub Vec<Span>);

impl Trace {
    /// The one span named `name` whose parent is `parent`.
    pub fn child(&self, parent: &str, name: &str) -> &Span {
        let found: Vec<&Span> = self
            .0
            .iter()
            .filter(|s| s.name == name && s.parent_span_id == parent)
            .collect();
        assert!(
            !found.is_empty(),
            "no {name} span under {parent} in the trace:\n{}",
            self.dump()
        );
        found[0]
    }

    /// Every span named `name` whose parent is `parent`.
    pub fn children(&self, parent: &str, name: &str) -> Vec<&Span> {
        self.0
            .iter()
            .filter(|s| s.name == name && s.parent_span_id == parent)
            .collect()
    }

    pub fn dump(&self) -> String {
        self.0
            .iter()
            .map(|s| {
                format!(
                    "  {} {} <- {} {:?}",
                    s.name, s.span_id, s.parent_span_id, s.attributes
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
