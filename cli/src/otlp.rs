//! `--otlp-endpoint`: the broker's logging, and the export of publish traces to an
//! OpenTelemetry collector over OTLP/gRPC.
//!
//! Logs go to stderr through one `fmt` layer filtered by `RUST_LOG` (default
//! `info,openraft=warn`). With `--otlp-endpoint`, a second layer (tracing-opentelemetry)
//! takes only the spans of [`PUBLISH_TRACE_TARGET`] (TRACE level) and hands them to the
//! SDK's batch exporter, a thread of its own that sends them over tonic. Without it,
//! nothing enables TRACE for any target, so the broker's publish spans stay disabled
//! (`Span::none()` after one comparison of levels).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::args::LogFormat;
pub use eventtermq_broker::metrics::PUBLISH_TRACE_TARGET;

/// What the export needs from the flags.
pub struct OtlpSettings {
    /// `--otlp-endpoint`, an http:// URL.
    pub endpoint: String,
    /// `--otlp-sample-ratio`, 0 to 1.
    pub sample_ratio: f64,
    /// The node's advertised address: the `service.instance.id` of its spans.
    pub instance: String,
}

impl OtlpSettings {
    /// The settings, or the flag and rule they break. The URL is not repeated in the
    /// error: it may carry credentials.
    pub fn new(endpoint: &str, sample_ratio: f64, instance: String) -> Result<Self, String> {
        if !endpoint.starts_with("http://") || endpoint.len() == "http://".len() {
            return Err("--otlp-endpoint: must be an http:// URL of an OTLP/gRPC collector (TLS is not supported), \
                        e.g. http://127.0.0.1:4317"
                .into());
        }
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(format!("--otlp-sample-ratio: must be from 0 to 1, got {sample_ratio}"));
        }
        Ok(OtlpSettings { endpoint: endpoint.to_string(), sample_ratio, instance })
    }
}

/// The export's settings from the broker's flags (`None`: no `--otlp-endpoint`);
/// `instance` is the node's advertised address.
pub fn settings(args: &crate::args::BrokerArgs, instance: &str) -> Result<Option<OtlpSettings>, String> {
    let endpoint = args.otlp_endpoint.as_deref();
    endpoint.map(|e| OtlpSettings::new(e, args.otlp_sample_ratio, instance.to_string())).transpose()
}

/// Exports spans until dropped; [`Exporter::shutdown`] sends what is still buffered.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Sends the spans still buffered and stops the export thread.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("warning: --otlp-endpoint: the last spans may not have been exported: {e}");
        }
    }
}

/// Installs the logging of a broker and, with `otlp`, the export of publish traces.
/// Must run inside the tokio runtime (the exporter's gRPC channel lives on it).
pub fn init_broker_logging(format: LogFormat, otlp: Option<&OtlpSettings>) -> Result<Option<Exporter>, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(fmt_layer(format, filter));
    let Some(otlp) = otlp else {
        registry.try_init().map_err(|e| e.to_string())?;
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint.as_str())
        .build()
        .map_err(|e| format!("--otlp-endpoint: cannot set up the exporter: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("eventtermq")
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", otlp.instance.clone()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(otlp.sample_ratio))))
        .with_resource(resource)
        .build();
    let traces = tracing_opentelemetry::layer().with_tracer(provider.tracer("eventtermq")).with_filter(
        tracing_subscriber::filter::Targets::new().with_target(PUBLISH_TRACE_TARGET, tracing::Level::TRACE),
    );
    registry.with(traces).try_init().map_err(|e| e.to_string())?;
    Ok(Some(Exporter { provider }))
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// The log levels without `RUST_LOG`.
const DEFAULT_FILTER: &str = "info,openraft=warn";

/// Logs on stderr, at the levels of `filter` (`RUST_LOG`).
fn fmt_layer(format: LogFormat, filter: tracing_subscriber::EnvFilter) -> BoxedLayer {
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        // Colour codes only on a terminal: a file or `kubectl logs` shows them raw.
        LogFormat::Text => {
            layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_filter(filter).boxed()
        }
        LogFormat::Json => layer.json().with_filter(filter).boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_exporter_nothing_enables_the_trace_level() {
        // The most verbose level any layer wants: a TRACE span's macro compares against
        // it first, and stops there.
        use tracing::Subscriber;
        let hint = |format| {
            let filter = tracing_subscriber::EnvFilter::new(DEFAULT_FILTER);
            tracing_subscriber::registry().with(fmt_layer(format, filter)).max_level_hint()
        };
        assert_eq!(hint(LogFormat::Text), Some(tracing::level_filters::LevelFilter::INFO));
        assert_eq!(hint(LogFormat::Json), Some(tracing::level_filters::LevelFilter::INFO));
    }

    #[test]
    fn settings_name_the_flag_and_rule_and_never_echo_the_url() {
        let e = OtlpSettings::new("https://user:secret@collector:4317", 1.0, "n".into()).err().unwrap();
        assert!(e.starts_with("--otlp-endpoint: must be an http:// URL"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(OtlpSettings::new("http://", 1.0, "n".into()).is_err());
        let e = OtlpSettings::new("http://127.0.0.1:4317", 1.5, "n".into()).err().unwrap();
        assert_eq!(e, "--otlp-sample-ratio: must be from 0 to 1, got 1.5");
        let ok = OtlpSettings::new("http://127.0.0.1:4317", 0.25, "n".into()).unwrap();
        assert_eq!((ok.endpoint.as_str(), ok.sample_ratio), ("http://127.0.0.1:4317", 0.25));
    }
}
