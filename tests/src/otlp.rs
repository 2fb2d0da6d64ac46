//! An in-process OTLP/gRPC trace collector: the `TraceService` of opentelemetry-proto on a loopback port, keeping
//! every span the nodes export for the tests to inspect.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
};
use tokio_util::sync::CancellationToken;

/// One exported span, its ids as lowercase hex (the W3C `traceparent` spelling).
#[derive(Clone, Debug)]
pub struct Span {
    /// The span's name, such as `distcache.Cache/Get`.
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `service.name` of the exporting process.
    pub service: String,
    /// The exporting process's resource attributes (`service.name`, `k8s.pod.name`, ...).
    pub resource: BTreeMap<String, String>,
    /// String forms of the span's attributes.
    pub attributes: BTreeMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

struct Service {
    /// `None`: count only (a benchmark's sink keeps nothing, so that it costs the machine next to nothing).
    spans: Option<Spans>,
    count: Arc<AtomicU64>,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter().map(|kv| (kv.key.clone(), text(kv.value.as_ref()))).collect()
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let spans: usize =
            request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.count.fetch_add(spans as u64, Ordering::Relaxed);
        let Some(kept) = &self.spans else {
            return Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }));
        };
        let mut received = Vec::new();
        for resource in request.resource_spans {
            let resource_attributes =
                resource.resource.as_ref().map(|r| attributes(&r.attributes)).unwrap_or_default();
            let service = resource_attributes.get("service.name").cloned().unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    received.push(Span {
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        service: service.clone(),
                        resource: resource_attributes.clone(),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        kept.lock().unwrap_or_else(PoisonError::into_inner).extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{b:02x}"));
        out
    })
}

/// A running collector; stops when dropped.
pub struct Collector {
    /// Bound address.
    pub addr: SocketAddr,
    spans: Spans,
    count: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Collector {
    /// Serves on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on `addr`, keeping every span.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        Self::serve(addr, true).await
    }

    /// Serves on `addr`, counting the spans without keeping them ([`Collector::spans`] stays empty).
    pub async fn start_counting_on(addr: SocketAddr) -> std::io::Result<Self> {
        Self::serve(addr, false).await
    }

    async fn serve(addr: SocketAddr, keep: bool) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let spans = Spans::default();
        let count = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let service = TraceServiceServer::new(Service {
            spans: keep.then(|| Arc::clone(&spans)),
            count: Arc::clone(&count),
        });
        let stopped = stop.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped.cancelled_owned())
                .await;
        });
        Ok(Self { addr, spans, count, stop })
    }

    /// The endpoint for `tracing.otlpEndpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How many spans were received so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
