//! Prometheus metrics: the recorder, the HTTP middleware, and gauges refreshed at scrape time.
//!
//! Metric names (all prefixed `kilocloud_`):
//! - `http_requests_total{method,route,status}`, `http_request_duration_seconds{method,route}`
//! - `queue_depth{queue,state}` (state = ready | delayed | in_flight),
//!   `queue_oldest_message_age_seconds{queue}`, `queue_dead_letters{queue}`
//! - `alarm_lag_seconds` (histogram: scheduled time → handler start), `alarm_retries_total`,
//!   `alarm_dropped_total`
//! - `actor_overloaded_total{actor_type}`
//! - `queue_sent_total`, `queue_acked_total`, `queue_dead_lettered_total`,
//!   `queue_stale_receipts_total` (per queue)
//! - `sqlite_group_commit_jobs` (summary: writes per SQLite transaction)

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use kilocloud_substrate::Substrate;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from 100 µs to 30 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (tests); keep ours usable either way.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Records request count and latency by method, matched route and status.
pub async fn track_http(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!("kilocloud_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status)
    .increment(1);
    metrics::histogram!("kilocloud_http_request_duration_seconds",
        "method" => method, "route" => route)
    .record(start.elapsed().as_secs_f64());
    res
}

/// Renders the exposition text after refreshing the queue gauges from the store.
pub async fn render(handle: &PrometheusHandle, substrate: &Substrate) -> String {
    match substrate.queues().stats().await {
        Ok(stats) => {
            for s in stats {
                for (state, n) in [
                    ("ready", s.ready),
                    ("delayed", s.delayed),
                    ("in_flight", s.in_flight),
                ] {
                    metrics::gauge!("kilocloud_queue_depth", "queue" => s.queue.clone(), "state" => state)
                        .set(n as f64);
                }
                metrics::gauge!("kilocloud_queue_oldest_message_age_seconds", "queue" => s.queue.clone())
                    .set(s.oldest_ready_age_ms as f64 / 1000.0);
                metrics::gauge!("kilocloud_queue_dead_letters", "queue" => s.queue)
                    .set(s.dead as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read queue stats for /metrics"),
    }
    handle.render()
}
