//! What trace export a process does: `[telemetry]` with the standard `OTEL_*` variables over
//! it, resolved into one [`TraceExport`] (or none) and checked, so `--check-config` reports a
//! bad variable as it reports a bad key.
//!
//! The OpenTelemetry SDK reads some of these variables itself, but not the ones that turn
//! export on or off (`OTEL_TRACES_EXPORTER`, `OTEL_SDK_DISABLED`), and a value the program
//! passes beats the variable it would read. So every value is resolved here, variables
//! first, and passed on explicitly. Left to the SDK and the exporter, which read them
//! themselves: `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*` and the span limits.

use super::TelemetryConfig;

/// The process's environment, as [`TelemetryConfig::resolve`] reads it: unset and empty are
/// the same.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Trace export as resolved: where spans go, under which name, sampled how.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TraceExport {
    /// The traces URL, `/v1/traces` included.
    pub endpoint: String,
    /// `service.name`, unless `OTEL_RESOURCE_ATTRIBUTES` names one (then `None`: the SDK
    /// reads it).
    pub service_name: Option<String>,
    /// Which traces are kept.
    pub sampler: Sampler,
}

/// The standard samplers, as `OTEL_TRACES_SAMPLER` names them.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Sampler {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// This share of traces, by trace id.
    TraceIdRatio(f64),
    /// What the caller's sampled flag says, and this sampler for traces that start here.
    ParentBased(Root),
}

/// The sampler of a [`Sampler::ParentBased`] for traces without a parent.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Root {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// This share of traces, by trace id.
    TraceIdRatio(f64),
}

/// The one protocol this build exports with.
const PROTOCOL: &str = "http/protobuf";

impl TelemetryConfig {
    /// The export this process does, `program` naming its service when nothing else does;
    /// `Ok(None)` when export is off. Every problem is reported, each naming its key or
    /// variable.
    pub fn resolve(
        &self,
        program: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TraceExport>, Vec<String>> {
        let mut problems = Vec::new();
        let mut on = self.enabled;
        match env("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None => {}
            Some("otlp") => on = true,
            Some("none") => on = false,
            Some(other) => problems.push(format!(
                "OTEL_TRACES_EXPORTER: {other:?} is not supported: \"otlp\" or \"none\""
            )),
        }
        match env("OTEL_SDK_DISABLED").map(|v| v.trim().to_ascii_lowercase()) {
            None => {}
            Some(v) if v == "true" => on = false,
            Some(v) if v == "false" => {}
            Some(v) => problems.push(format!("OTEL_SDK_DISABLED: {v:?} is not true or false")),
        }
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = env(var).filter(|p| p.trim() != PROTOCOL) {
                problems.push(format!(
                    "{var}: {p:?} is not supported: this build exports {PROTOCOL}"
                ));
            }
        }
        let endpoint = match (
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(url), _) => checked_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url, &mut problems),
            (None, Some(base)) => {
                checked_url("OTEL_EXPORTER_OTLP_ENDPOINT", traces(&base), &mut problems)
            }
            (None, None) => {
                checked_url("telemetry.endpoint", traces(&self.endpoint), &mut problems)
            }
        };
        let sampler = match env("OTEL_TRACES_SAMPLER") {
            Some(name) => {
                let ratio = match env("OTEL_TRACES_SAMPLER_ARG") {
                    Some(arg) => ratio(
                        "OTEL_TRACES_SAMPLER_ARG",
                        arg.trim().parse().ok(),
                        &arg,
                        &mut problems,
                    ),
                    None => 1.0,
                };
                sampler("OTEL_TRACES_SAMPLER", &name, ratio, &mut problems)
            }
            None => {
                let r = self.sampler_ratio;
                let r = ratio(
                    "telemetry.sampler_ratio",
                    Some(r),
                    &r.to_string(),
                    &mut problems,
                );
                sampler("telemetry.sampler", &self.sampler, r, &mut problems)
            }
        };
        let named_by_attributes = env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
            a.split(',')
                .any(|kv| kv.trim_start().starts_with("service.name="))
        });
        let service_name = match env("OTEL_SERVICE_NAME") {
            Some(name) => Some(name),
            None if named_by_attributes => None,
            None if !self.service_name.is_empty() => Some(self.service_name.clone()),
            None => Some(program.to_owned()),
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(on.then_some(TraceExport {
            endpoint,
            service_name,
            sampler,
        }))
    }
}

/// The traces URL under a collector's base URL, as the OTLP specification builds it.
fn traces(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

fn checked_url(key: &str, url: String, problems: &mut Vec<String>) -> String {
    let host = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .map(|rest| rest.split(['/', '?']).next().unwrap_or(""));
    if url.contains('@') {
        // Never echoed: the part before the @ may be a password.
        problems.push(format!(
            "{key}: credentials do not belong in the URL; use OTEL_EXPORTER_OTLP_HEADERS"
        ));
    } else if host.is_none_or(str::is_empty) {
        problems.push(format!("{key}: {url:?} is not an http:// or https:// URL"));
    }
    url
}

fn ratio(key: &str, parsed: Option<f64>, text: &str, problems: &mut Vec<String>) -> f64 {
    match parsed {
        Some(r) if (0.0..=1.0).contains(&r) => r,
        _ => {
            problems.push(format!("{key}: {text:?} is not a ratio from 0 to 1"));
            1.0
        }
    }
}

fn sampler(key: &str, name: &str, ratio: f64, problems: &mut Vec<String>) -> Sampler {
    match name.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatio(ratio),
        "parentbased_always_on" => Sampler::ParentBased(Root::AlwaysOn),
        "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
        "parentbased_traceidratio" => Sampler::ParentBased(Root::TraceIdRatio(ratio)),
        other => {
            problems.push(format!(
                "{key}: {other:?} is not a sampler: always_on, always_off, traceidratio, \
                 parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
            ));
            Sampler::AlwaysOn
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        config: &TelemetryConfig,
        vars: &[(&str, &str)],
    ) -> Result<Option<TraceExport>, Vec<String>> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        config.resolve("amqp-rpcd", |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn off_by_default_and_the_variables_turn_it_on() {
        let config = TelemetryConfig::default();
        assert_eq!(resolve(&config, &[]), Ok(None));
        let on = resolve(
            &config,
            &[
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(on.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(on.service_name.as_deref(), Some("amqp-rpcd"));
        assert_eq!(on.sampler, Sampler::ParentBased(Root::AlwaysOn));
    }

    #[test]
    fn variables_win_over_keys() {
        let config = TelemetryConfig {
            enabled: true,
            endpoint: "http://from-config:4318".into(),
            service_name: "configured".into(),
            sampler: "always_off".into(),
            sampler_ratio: 0.5,
        };
        let r = resolve(&config, &[]).unwrap().unwrap();
        assert_eq!(r.endpoint, "http://from-config:4318/v1/traces");
        assert_eq!(r.service_name.as_deref(), Some("configured"));
        assert_eq!(r.sampler, Sampler::AlwaysOff);
        let r = resolve(
            &config,
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c/custom"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored"),
                ("OTEL_SERVICE_NAME", "env-name"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.endpoint, "https://c/custom");
        assert_eq!(r.service_name.as_deref(), Some("env-name"));
        assert_eq!(r.sampler, Sampler::ParentBased(Root::TraceIdRatio(0.25)));
        assert_eq!(
            resolve(&config, &[("OTEL_TRACES_EXPORTER", "none")]),
            Ok(None)
        );
        assert_eq!(resolve(&config, &[("OTEL_SDK_DISABLED", "TRUE")]), Ok(None));
        let named = resolve(
            &config,
            &[("OTEL_RESOURCE_ATTRIBUTES", "a=b, service.name=x")],
        );
        assert_eq!(named.unwrap().unwrap().service_name, None);
    }

    #[test]
    fn every_problem_is_named() {
        let config = TelemetryConfig {
            endpoint: "collector:4318".into(),
            sampler: "sometimes".into(),
            sampler_ratio: 2.0,
            ..TelemetryConfig::default()
        };
        let problems = resolve(
            &config,
            &[
                ("OTEL_TRACES_EXPORTER", "zipkin"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SDK_DISABLED", "maybe"),
            ],
        )
        .unwrap_err();
        for key in [
            "OTEL_TRACES_EXPORTER",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_SDK_DISABLED",
            "telemetry.endpoint",
            "telemetry.sampler:",
            "telemetry.sampler_ratio",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key}: {problems:?}"
            );
        }
        let secret = resolve(
            &TelemetryConfig::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://user:pw@c:4318")],
        )
        .unwrap_err();
        assert!(secret.iter().all(|p| !p.contains("pw")), "{secret:?}");
        let bad_arg = resolve(
            &TelemetryConfig::default(),
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "x"),
            ],
        );
        assert!(bad_arg.unwrap_err()[0].starts_with("OTEL_TRACES_SAMPLER_ARG"));
    }
}
