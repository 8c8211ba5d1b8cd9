//! gRPC server metrics, per method and status code: a tower layer on every
//! server ([`crate::grpc::serve`]).
//!
//! - `streamer_grpc_server_handled_total{service,method,code}` counts a call
//!   when it ends: at the response headers when they carry `grpc-status` (a
//!   trailers-only answer, such as any error before the first message),
//!   otherwise at the trailers that close the response body. So a streaming
//!   call (`Receive`, the edge stream, `Claim`) counts once, when its stream
//!   ends, with the code it ended with; a stream the client abandons
//!   counts as `cancelled`.
//! - `streamer_grpc_server_handling_seconds{service,method}` observes the
//!   time from the call's arrival to that same end: for a streaming call its
//!   whole life, which is why the dashboard's latency panels read unary
//!   methods.
//!
//! The layer sits outside caller authentication, so refused calls count
//! too (`unauthenticated`, `permission_denied`). Only the methods this
//! server serves are labelled by name (known from the descriptor sets);
//! any other path counts as `service="unknown",method="unknown"`, so a
//! caller cannot make series up.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::SharedString;
use prost::Message as _;

use crate::metrics::{family_named, grpc_code, touch};

const HANDLED: &str = "streamer_grpc_server_handled_total";
const HANDLING: &str = "streamer_grpc_server_handling_seconds";

/// The methods of one server, by path, with their labels (shared, so that
/// a call's labels cost no allocation).
#[derive(Debug, Default)]
struct Methods(HashMap<String, (SharedString, SharedString)>);

impl Methods {
    /// Every method of `services` (full names) as the descriptor sets of the
    /// Streamer API, health and reflection describe them.
    fn of(services: &[&str]) -> Self {
        let sets = [
            streamer_api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut methods = HashMap::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let full = format!("{package}.{}", service.name.unwrap_or_default());
                    if !services.contains(&full.as_str()) {
                        continue;
                    }
                    let label = SharedString::from(Arc::<str>::from(full.as_str()));
                    for method in service.method {
                        let name = method.name.unwrap_or_default();
                        let path = format!("/{full}/{name}");
                        methods.insert(path, (label.clone(), Arc::<str>::from(name).into()));
                    }
                }
            }
        }
        Self(methods)
    }

    fn labels(&self, path: &str) -> (SharedString, SharedString) {
        self.0.get(path).cloned().unwrap_or_else(|| {
            (
                SharedString::const_str("unknown"),
                SharedString::const_str("unknown"),
            )
        })
    }
}

/// Counts and times every call to the services named.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    methods: Arc<Methods>,
}

impl GrpcMetricsLayer {
    /// For a server of `services` (full names, health and reflection
    /// included); creates each method's `ok` series at 0. Other codes
    /// appear with their first call: every code of every method at 0 would
    /// be hundreds of series that never move.
    pub fn new(services: &[&str]) -> Self {
        let methods = Methods::of(services);
        if let (Some(handled), Some(handling)) = (family_named(HANDLED), family_named(HANDLING)) {
            for (service, method) in methods.0.values() {
                let labels = || {
                    vec![
                        metrics::Label::new("service", service.clone()),
                        metrics::Label::new("method", method.clone()),
                    ]
                };
                let mut with_code = labels();
                with_code.push(metrics::Label::new("code", "ok"));
                touch(handled, with_code);
                touch(handling, labels());
            }
        }
        Self {
            methods: Arc::new(methods),
        }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            methods: self.methods.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    methods: Arc<Methods>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = self.methods.labels(request.uri().path());
        let mut call = Call {
            service,
            method,
            started: Instant::now(),
            done: false,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    if let Some(code) = status_of(response.headers()) {
                        call.finish(code);
                        return Ok(response);
                    }
                    Ok(response.map(|body| {
                        tonic::body::Body::new(Counted {
                            inner: body,
                            call: Some(call),
                        })
                    }))
                }
                Err(error) => {
                    call.finish(tonic::Code::Unknown);
                    Err(error)
                }
            }
        })
    }
}

/// The `grpc-status` of headers or trailers.
fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|value| tonic::Code::from_bytes(value.as_bytes()))
}

/// One call being measured; counted once, when it ends (as `cancelled`
/// if dropped first).
struct Call {
    service: SharedString,
    method: SharedString,
    started: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let (service, method) = (self.service.clone(), self.method.clone());
        metrics::counter!(HANDLED, "service" => service.clone(), "method" => method.clone(), "code" => grpc_code(code))
            .increment(1);
        metrics::histogram!(HANDLING, "service" => service, "method" => method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that finishes its call at the trailers.
struct Counted {
    inner: tonic::body::Body,
    call: Option<Call>,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|trailers| status_of(trailers).unwrap_or(tonic::Code::Unknown)),
            Poll::Ready(Some(Err(status))) => Some(status.code()),
            // Ended without trailers: not a gRPC answer.
            Poll::Ready(None) => Some(tonic::Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(mut call) = self.call.take()
        {
            call.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_methods_of_the_served_services_are_known_by_path() {
        let methods = Methods::of(&["streamer.v1.ConnectionService", "grpc.health.v1.Health"]);
        assert_eq!(
            methods.labels("/streamer.v1.ConnectionService/Send"),
            ("streamer.v1.ConnectionService".into(), "Send".into())
        );
        assert_eq!(
            methods.labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health".into(), "Check".into())
        );
        // Not served here, or made up: one bounded series.
        for path in ["/streamer.v1.AuthService/ValidateToken", "/x/y"] {
            assert_eq!(methods.labels(path), ("unknown".into(), "unknown".into()));
        }
    }
}
