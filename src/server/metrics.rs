//! The daemon's metric families, registered into the one registry `main` creates and passes
//! down (no global statics, so tests can run several daemons in one process).
//!
//! Every labelled family shows each label value it can take from the start, at zero
//! ([`Metrics::expose_methods`], [`Rejected::ALL`]): an alert on the rate of a series that
//! does not exist yet never fires, and a dashboard panel stays empty instead of showing 0.

use crate::protocol::ErrorCode;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The `method` label of requests whose `type` names no method: bounded, unlike the names
/// callers may send.
pub const UNKNOWN_METHOD_LABEL: &str = "unknown";

/// Why a request could not be answered at all: `amqp_rpc_rejected_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejected {
    /// No `reply_to`: nobody to answer.
    NoReplyTo,
    /// Publishing the reply broke the (wary) reply link: the caller is gone.
    ReplyToUnreachable,
    /// A `reply_to` that `service.reply_to` does not allow.
    ReplyToRefused,
    /// A `reply_to` that claims to be a direct reply-to address and is not shaped like one.
    ReplyToMalformed,
}

impl From<crate::reply_to::Refusal> for Rejected {
    fn from(refusal: crate::reply_to::Refusal) -> Self {
        match refusal {
            crate::reply_to::Refusal::NotAllowed => Rejected::ReplyToRefused,
            crate::reply_to::Refusal::MalformedDirect => Rejected::ReplyToMalformed,
        }
    }
}

impl Rejected {
    /// Every reason, exposed at zero from the start.
    pub const ALL: [Rejected; 4] = [
        Rejected::NoReplyTo,
        Rejected::ReplyToUnreachable,
        Rejected::ReplyToRefused,
        Rejected::ReplyToMalformed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::NoReplyTo => "no_reply_to",
            Rejected::ReplyToUnreachable => "reply_to_unreachable",
            Rejected::ReplyToRefused => "reply_to_refused",
            Rejected::ReplyToMalformed => "reply_to_malformed",
        }
    }
}

/// Every `outcome` label value: `ok` and each error code.
fn outcomes() -> impl Iterator<Item = &'static str> {
    std::iter::once("ok").chain(ErrorCode::ALL.iter().map(|c| c.as_str()))
}

/// Handles to every family; cheap to clone (each is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `amqp_rpc_requests_total{method,outcome}`: answered requests by outcome
    /// (`ok` or an error code).
    pub requests: IntCounterVec,
    /// `amqp_rpc_request_duration_seconds{method}`: from delivery until the reply is on its
    /// way (the ack follows once the reply is confirmed; see `settle.rs`).
    pub duration: HistogramVec,
    /// `amqp_rpc_in_flight`: deliveries being handled now.
    pub in_flight: IntGauge,
    /// `amqp_rpc_redeliveries_total`: deliveries flagged redelivered.
    pub redeliveries: IntCounter,
    /// `amqp_rpc_replays_total`: replies served from the reply cache.
    pub replays: IntCounter,
    /// `amqp_rpc_poison_total`: requests given up after `max_deliveries`.
    pub poison: IntCounter,
    /// `amqp_rpc_expired_total`: requests dropped because their deadline had passed.
    pub expired: IntCounter,
    /// `amqp_rpc_rejected_total{reason}`: requests that could not be answered at all.
    pub rejected: IntCounterVec,
    /// `amqp_rpc_reply_publish_failures_total`.
    pub reply_publish_failures: IntCounter,
    /// `amqp_rpc_connection_up`: 1 while connected and consuming.
    pub connection_up: IntGauge,
    /// `amqp_rpc_connection_blocked`: 1 while the broker blocks the connection (a memory or
    /// disk alarm): replies cannot be published until it ends.
    pub connection_blocked: IntGauge,
    /// `amqp_rpc_reconnects_total`.
    pub reconnects: IntCounter,
    /// `amqp_rpc_ack_frames_total`: `basic.ack` frames sent (see `ledger.rs`).
    pub ack_frames: IntCounter,
}

impl Metrics {
    /// Create the families and register them (plus `amqp_rpc_build_info`) in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "amqp_rpc_requests_total",
                    "Requests answered, by method and outcome",
                ),
                &["method", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "amqp_rpc_request_duration_seconds",
                    "Time from delivery until the reply is handed to the broker",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["method"],
            )?,
            in_flight: IntGauge::new("amqp_rpc_in_flight", "Deliveries being handled")?,
            redeliveries: IntCounter::new(
                "amqp_rpc_redeliveries_total",
                "Deliveries the broker flagged as redelivered",
            )?,
            replays: IntCounter::new(
                "amqp_rpc_replays_total",
                "Replies served from the reply cache without running the handler",
            )?,
            poison: IntCounter::new(
                "amqp_rpc_poison_total",
                "Requests given up after max_deliveries attempts",
            )?,
            expired: IntCounter::new(
                "amqp_rpc_expired_total",
                "Requests dropped unprocessed because their deadline had passed",
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "amqp_rpc_rejected_total",
                    "Requests that could not be answered",
                ),
                &["reason"],
            )?,
            reply_publish_failures: IntCounter::new(
                "amqp_rpc_reply_publish_failures_total",
                "Replies the broker did not accept",
            )?,
            connection_up: IntGauge::new(
                "amqp_rpc_connection_up",
                "1 while connected to the broker and consuming",
            )?,
            connection_blocked: IntGauge::new(
                "amqp_rpc_connection_blocked",
                "1 while the broker blocks the connection (memory or disk alarm)",
            )?,
            reconnects: IntCounter::new(
                "amqp_rpc_reconnects_total",
                "Broker connections re-established after a loss",
            )?,
            ack_frames: IntCounter::new(
                "amqp_rpc_ack_frames_total",
                "basic.ack frames queued for the broker; one frame acks every request settled \
                 together (multiple=true), so under load this grows slower than the requests \
                 answered",
            )?,
        };
        let build_info = IntGaugeVec::new(
            Opts::new("amqp_rpc_build_info", "Build information"),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.redeliveries.clone()))?;
        registry.register(Box::new(m.replays.clone()))?;
        registry.register(Box::new(m.poison.clone()))?;
        registry.register(Box::new(m.expired.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.reply_publish_failures.clone()))?;
        registry.register(Box::new(m.connection_up.clone()))?;
        registry.register(Box::new(m.connection_blocked.clone()))?;
        registry.register(Box::new(m.reconnects.clone()))?;
        registry.register(Box::new(m.ack_frames.clone()))?;
        registry.register(Box::new(build_info))?;
        for reason in Rejected::ALL {
            m.rejected.with_label_values(&[reason.as_str()]);
        }
        m.expose_methods(std::iter::empty());
        Ok(m)
    }

    /// Expose the per-method series of these methods (and of unknown ones) at zero: every
    /// outcome's counter and the duration histogram.
    pub fn expose_methods<'a>(&self, methods: impl IntoIterator<Item = &'a str>) {
        for method in methods.into_iter().chain([UNKNOWN_METHOD_LABEL]) {
            self.duration_for(method);
            for outcome in outcomes() {
                self.request(method, outcome);
            }
        }
    }

    /// Count a request that could not be answered.
    pub fn reject(&self, reason: Rejected) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// The request counter for one method and outcome.
    pub fn request(&self, method: &str, outcome: &str) -> IntCounter {
        self.requests.with_label_values(&[method, outcome])
    }

    /// The duration histogram for one method.
    pub fn duration_for(&self, method: &str) -> Histogram {
        self.duration.with_label_values(&[method])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label sets of one family in the registry's output.
    fn series(registry: &Registry, family: &str) -> Vec<Vec<(String, String)>> {
        registry
            .gather()
            .iter()
            .filter(|mf| mf.name() == family)
            .flat_map(|mf| mf.get_metric())
            .map(|m| {
                m.get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), l.value().to_owned()))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn every_label_value_is_exposed_before_it_happens() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        metrics.expose_methods(["fib", "echo"]);
        let rejected = series(&registry, "amqp_rpc_rejected_total");
        assert_eq!(rejected.len(), Rejected::ALL.len());
        let requests = series(&registry, "amqp_rpc_requests_total");
        // fib, echo and unknown, each with ok and every code.
        assert_eq!(requests.len(), 3 * (1 + ErrorCode::ALL.len()));
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert!(requests.contains(&vec![pair("method", "echo"), pair("outcome", "internal")]));
        assert_eq!(
            series(&registry, "amqp_rpc_request_duration_seconds").len(),
            3
        );
    }
}
