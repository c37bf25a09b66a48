//! Trace export of our binaries (each includes this file): an OpenTelemetry tracer provider
//! exporting over OTLP/HTTP protobuf, built from the resolved [`TraceExport`], and the W3C
//! propagator the library's headers use.
//!
//! Spans leave in batches from the SDK's own thread (the blocking HTTP client: that thread
//! has no tokio runtime). [`Export::shutdown`] sends what is left; `main` calls it after the
//! runtime has stopped, outside it, as the SDK asks of a current-thread runtime.

use amqp_rpc::config::telemetry::{Root, Sampler, TraceExport};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler as SdkSampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// The export running: its tracer for the tracing layer, and the provider to shut down.
pub struct Export {
    provider: SdkTracerProvider,
}

impl Export {
    /// Build the exporter and install the W3C propagator. Nothing is sent until spans end.
    pub fn start(export: &TraceExport) -> Result<Export, String> {
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(export.endpoint.clone())
            .build()
            .map_err(|e| format!("telemetry: {e}"))?;
        let mut resource = Resource::builder();
        if let Some(name) = &export.service_name {
            resource = resource.with_service_name(name.clone());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler(export.sampler))
            .with_resource(resource.build())
            .build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Export { provider })
    }

    /// The tracer the tracing layer sends spans to.
    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("amqp-rpc")
    }

    /// Send the spans still waiting (bounded by the exporter's timeout) and stop.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("telemetry: spans may be lost: {e}");
        }
    }
}

fn sampler(s: Sampler) -> SdkSampler {
    let root = |r: Root| match r {
        Root::AlwaysOff => SdkSampler::AlwaysOff,
        Root::TraceIdRatio(r) => SdkSampler::TraceIdRatioBased(r),
        _ => SdkSampler::AlwaysOn,
    };
    match s {
        Sampler::AlwaysOff => SdkSampler::AlwaysOff,
        Sampler::TraceIdRatio(r) => SdkSampler::TraceIdRatioBased(r),
        Sampler::ParentBased(r) => SdkSampler::ParentBased(Box::new(root(r))),
        _ => SdkSampler::AlwaysOn,
    }
}
