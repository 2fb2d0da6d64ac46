//! Logs and traces of the DistCache node and operator: the process's `tracing` subscriber (text or JSON lines on
//! stderr) and, when a collector is configured, spans exported over OTLP/gRPC with W3C `traceparent` propagation.
//!
//! The request path's spans have their own target, [`SPANS`]. Without a collector no layer wants that target, so
//! a span macro costs one cached check and creates nothing: tracing off costs nothing measurable. With one, the
//! OpenTelemetry layer takes those spans only (never tonic's or h2's own, which would trace the exporter itself).
//!
//! The exporter and its batch processor run as tasks on the node's runtime: the SDK's default batch processor
//! exports from a thread of its own, where tonic panics with "no reactor running" and every span is dropped
//! silently (opentelemetry-rust #2673). A failed export is said once in the log (and again once it works again);
//! the node keeps serving either way.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    runtime,
    trace::{
        BatchConfigBuilder, Sampler, SdkTracerProvider, SpanData, SpanExporter,
        span_processor_with_async_runtime::BatchSpanProcessor,
    },
};
use tracing::{Event, Subscriber, field::Visit};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::Targets,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer, time::FormatTime},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

/// What [`init`] sets up.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// JSON lines instead of text (`DISTCACHE_LOG=json` also selects them).
    pub json: bool,
    /// Log levels in `RUST_LOG` syntax (default `info`); `RUST_LOG`, when set, wins.
    pub level: Option<String>,
    /// The OTLP/gRPC collector; `None`: the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; with neither, no spans are made.
    pub otlp_endpoint: Option<String>,
    /// Share of root requests traced (default [`DEFAULT_SAMPLE_RATIO`]); a caller's decision is followed.
    pub sample_ratio: Option<f64>,
    /// Whether spans may carry keys.
    pub record_keys: bool,
    /// `service.name` of the spans.
    pub service: String,
}

/// The default share of requests traced.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

/// The collector endpoint: `configured`, else the standard environment variables (an empty value is unset).
pub fn endpoint(configured: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
    set(configured.map(str::to_owned))
        .or_else(|| set(env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")))
        .or_else(|| set(env("OTEL_EXPORTER_OTLP_ENDPOINT")))
}

/// Checks a collector endpoint: an `http://` URL (the exporter speaks OTLP/gRPC without TLS). The message names
/// no field: the caller prefixes its own (`tracing.otlpEndpoint`, `spec.tracing.otlpEndpoint`).
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = endpoint.strip_prefix("http://").unwrap_or_default();
    if rest.is_empty() || rest.starts_with('/') || endpoint.contains(char::is_whitespace) {
        return Err(format!(
            "must be an http:// URL of an OTLP/gRPC collector (such as http://otel-collector:4317), got {endpoint:?}"
        ));
    }
    Ok(())
}

/// Checks a sample ratio: 0 to 1.
pub fn check_sample_ratio(ratio: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&ratio) { Ok(()) } else { Err(format!("must be between 0 and 1, got {ratio}")) }
}

/// Checks log levels in `RUST_LOG` syntax.
pub fn check_level(level: &str) -> Result<(), String> {
    if level.trim().is_empty() {
        return Err("must not be empty (such as info or warn,distcache_node=debug)".into());
    }
    EnvFilter::builder().parse(level).map(|_| ()).map_err(|e| {
        format!("{level:?} is not a valid filter (such as info or warn,distcache_node=debug): {e}")
    })
}

/// The target of the request path's spans (see the module documentation).
pub const SPANS: &str = "distcache_spans";

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// True once traces are exported: the propagation helpers do nothing otherwise.
static TRACING: AtomicBool = AtomicBool::new(false);

/// `tracing.recordKeys`.
static RECORD_KEYS: AtomicBool = AtomicBool::new(false);

/// Whether spans may carry the key itself (`tracing.recordKeys`).
pub fn record_keys() -> bool {
    RECORD_KEYS.load(Ordering::Relaxed)
}

/// Records how the current request was answered on its span (`distcache.outcome`): `hit`, `hot_hit`, `stale`,
/// `miss` (loaded here) or `forwarded` (asked the owner). Nothing when tracing is off.
pub fn record_outcome(outcome: &'static str) {
    if tracing_enabled() {
        tracing::Span::current().record("distcache.outcome", outcome);
    }
}

/// The share of root requests traced, as the bits of an `f64`.
static SAMPLE_RATIO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether a request that arrived with `metadata` is traced. Decided before any span is made, so that an
/// untraced request costs no span at all (a span the SDK samples out still costs its creation and its
/// attributes): a caller's `traceparent` decides by its sampled flag; without one, the sample ratio does.
pub fn sampled(metadata: &tonic::metadata::MetadataMap) -> bool {
    if !tracing_enabled() {
        return false;
    }
    match metadata.get("traceparent").and_then(|v| v.to_str().ok()) {
        // version-traceid-parentid-flags: bit 0 of the flags is "sampled".
        Some(traceparent) => traceparent
            .rsplit('-')
            .next()
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 1 == 1),
        None => sampled_root(),
    }
}

/// Whether a request without a caller's trace is traced: the sample ratio decides.
pub fn sampled_root() -> bool {
    if !tracing_enabled() {
        return false;
    }
    let ratio = f64::from_bits(SAMPLE_RATIO.load(Ordering::Relaxed));
    if ratio >= 1.0 {
        return true;
    }
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(seed());
    }
    // xorshift64*: a uniform draw in [0, 1) without a lock or a system call.
    let draw = STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    });
    #[allow(clippy::cast_precision_loss)] // 53 bits of the draw are plenty for a probability.
    let uniform = (draw >> 11) as f64 / (1u64 << 53) as f64;
    uniform < ratio
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()) ^ d.as_secs());
    let here = std::ptr::from_ref(&nanos) as usize as u64;
    (nanos ^ here.rotate_left(32)) | 1
}

/// Whether the current task is inside a traced request: the spans below a request's root are made only then.
pub fn in_trace() -> bool {
    tracing_enabled() && !tracing::Span::current().is_none()
}

/// Whether spans are exported (a collector is configured).
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// What [`init`] installed; [`Telemetry::shutdown`] exports the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber: logs as `settings` say and, with a collector, the OpenTelemetry layer. Must
/// run inside the tokio runtime that will serve: the exporter's connection and its batch processor are tasks on
/// it.
pub fn init(settings: &Settings) -> anyhow::Result<Telemetry> {
    let env = |name: &str| std::env::var(name).ok();
    let endpoint = endpoint(settings.otlp_endpoint.as_deref(), env);
    let sample_ratio = settings.sample_ratio.unwrap_or(DEFAULT_SAMPLE_RATIO);
    let provider = match &endpoint {
        Some(endpoint) => Some(provider(endpoint, &settings.service)?),
        None => None,
    };
    let otel = provider.as_ref().map(|provider| {
        // Without the source location, thread and busy/idle-time attributes the layer adds by default: four
        // strings and two clock reads per span that no one filters or alerts on.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(settings.service.clone()))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            // INFO, the level of every request-path span: this filter's level is the subscriber's ceiling too, and
            // at TRACE every trace!/debug! callsite of h2, hyper and tokio on the hot path would pass the static
            // level check and pay an interest lookup per call.
            .with_filter(Targets::new().with_target(SPANS, tracing::Level::INFO))
    });
    let json = settings.json || env("DISTCACHE_LOG").is_some_and(|v| v == "json");
    let directives = env("RUST_LOG").filter(|v| !v.trim().is_empty()).or_else(|| settings.level.clone());
    // The spans to export are for the exporter, not for log lines.
    let filter = || {
        EnvFilter::builder().parse_lossy(format!("{},{SPANS}=off", directives.as_deref().unwrap_or("info")))
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<_> + Send + Sync> = if json {
        Box::new(fmt.event_format(JsonLines).with_filter(filter()))
    } else {
        Box::new(fmt.with_filter(filter()))
    };
    tracing_subscriber::registry().with(otel).with(fmt).try_init()?;
    TRACING.store(provider.is_some(), Ordering::Relaxed);
    RECORD_KEYS.store(settings.record_keys, Ordering::Relaxed);
    SAMPLE_RATIO.store(sample_ratio.to_bits(), Ordering::Relaxed);
    if let Some(endpoint) = &endpoint {
        tracing::info!(
            endpoint = %endpoint,
            sample_ratio,
            record_keys = settings.record_keys,
            "exporting traces over OTLP/gRPC"
        );
    }
    Ok(Telemetry { provider })
}

fn provider(endpoint: &str, service: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot set up the OTLP exporter for {endpoint}: {e}"))?;
    let exporter = Noticing { inner: exporter, endpoint: endpoint.to_owned(), failing: Arc::default() };
    let batches = BatchSpanProcessor::builder(exporter, runtime::Tokio)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_secs(1))
                .with_max_export_timeout(EXPORT_TIMEOUT + Duration::from_secs(1))
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        // Roots are sampled before their span is made ([`sampled`]); every span made is exported.
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(Resource::builder().with_service_name(service.to_owned()).build())
        .build())
}

impl Telemetry {
    /// Exports the spans still queued (bounded by the export timeout) and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        // shutdown() blocks its thread until the batch task (on this runtime) has exported: off the runtime.
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("traces: the last spans could not be exported: {e}"),
            Err(e) => tracing::warn!("traces: stopping the exporter failed: {e}"),
        }
    }
}

/// The exporter, saying in the log when exports start failing and when they work again (once each).
#[derive(Debug)]
struct Noticing<E> {
    inner: E,
    endpoint: String,
    failing: Arc<AtomicBool>,
}

impl<E: SpanExporter> SpanExporter for Noticing<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => tracing::warn!(
                endpoint = %self.endpoint,
                "traces: cannot export {spans} spans to the collector ({e}); the node keeps serving, and says \
                 so again once exporting works"
            ),
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!(endpoint = %self.endpoint, "traces: exporting to the collector works again");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

// --- W3C trace context over gRPC metadata and HTTP headers ------------------------------------------------------

struct MetadataReader<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataWriter<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderWriter<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(key, value);
        }
    }
}

/// Makes `span` a child of the trace a caller sent in `traceparent` (if it sent one and tracing is on).
pub fn adopt_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if !tracing_enabled() || span.is_none() || metadata.get("traceparent").is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&MetadataReader(metadata));
    if parent.span().span_context().is_valid() {
        // Only fails when the span has started already, which a span just made has not.
        let _ = span.set_parent(parent);
    }
}

/// Adds the current span's `traceparent` to an outgoing call (nothing when no span is traced).
pub fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(context) = current_context() {
        TraceContextPropagator::new().inject_context(&context, &mut MetadataWriter(metadata));
    }
}

/// Adds the current span's `traceparent` to an outgoing HTTP request (nothing when no span is traced).
pub fn inject_headers(headers: &mut http::HeaderMap) {
    if let Some(context) = current_context() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderWriter(headers));
    }
}

fn current_context() -> Option<Context> {
    if !tracing_enabled() {
        return None;
    }
    let span = tracing::Span::current();
    if span.is_none() {
        return None;
    }
    let context = span.context();
    context.span().span_context().is_valid().then_some(context)
}

/// The trace and span ids of the current span, as hex, when it is traced.
fn current_ids() -> Option<(String, String)> {
    let context = current_context()?;
    let span = context.span();
    let ids = span.span_context();
    Some((ids.trace_id().to_string(), ids.span_id().to_string()))
}

// --- JSON lines ------------------------------------------------------------------------------------------------

/// One JSON object per event: `timestamp`, `level`, `target`, `message`, the event's fields, the innermost
/// span's name (`span`), and `trace_id`/`span_id` inside a traced request.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = serde_json::Map::new();
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        let meta = event.metadata();
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
        }
        if let Some((trace_id, span_id)) = current_ids() {
            line.insert("trace_id".into(), trace_id.into());
            line.insert("span_id".into(), span_id.into());
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}
