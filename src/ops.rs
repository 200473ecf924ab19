//! Operations endpoints: `/healthz` (the process runs), `/readyz` (rules loaded, storage open,
//! with details) and `/metrics` (Prometheus text).

use std::sync::{Arc, OnceLock};
use std::time::UNIX_EPOCH;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use warp::http::Response;
use warp::hyper::body::Bytes;
use warp::{Filter, Rejection};

use crate::ingress::{json_response, App};

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Every metric imrelay exports, with the help text `/metrics` shows for it. Labels: `command`
/// and `outcome` on callbacks, `rule` on rule metrics, `destination` on delivery metrics.
pub const METRICS_HELP: &[(&str, &str)] = &[
    ("imrelay_callbacks_total", "Callbacks answered, by command and outcome (ok, bad_request, unauthorized, forbidden, too_large, unavailable, error). A command is named once a callback naming it was accepted (up to 128 names); otherwise unverified, other, or invalid."),
    ("imrelay_callback_duration_seconds", "Time to answer a callback, from its body read to the answer."),
    ("imrelay_duplicates_total", "Callbacks Tencent delivered again, recognized by event id and not queued twice."),
    ("imrelay_rule_runs_total", "Rule runs on live events, by rule."),
    ("imrelay_rule_errors_total", "Rule runs that failed (error or time budget), by rule."),
    ("imrelay_rule_budget_overruns_total", "Rule runs stopped at the time budget, by rule."),
    ("imrelay_rule_duration_microseconds_total", "Time spent running each rule on live events, by rule (divide by runs for the mean)."),
    ("imrelay_rules_duration_seconds", "Time all rules together took on one event."),
    ("imrelay_rule_reloads_total", "Rule set changes published by hot reload, by outcome (ok, error: a file did not compile, refused: rule tests failed)."),
    ("imrelay_rule_problems", "Problems with the rule set in force (compile errors, failing rule tests)."),
    ("imrelay_rules_loaded", "Rules in the set in force."),
    ("imrelay_deliveries_total", "Delivery attempts, by destination and outcome (delivered, retry, dead)."),
    ("imrelay_delivery_duration_seconds", "Time one delivery attempt took, by destination."),
    ("imrelay_queue_depth", "Deliveries waiting or in flight, by destination."),
    ("imrelay_queue_full_total", "Callbacks refused with 503 because a destination's queue was full, by destination."),
    ("imrelay_dead_letters_total", "Deliveries dead-lettered after their last attempt, by destination."),
    ("imrelay_outbox_commit_seconds", "Time one outbox commit (a batch of callbacks and outcomes) took, fsync included."),
    ("imrelay_outbox_errors_total", "Outbox commits that failed."),
];

/// Installs the process-wide Prometheus recorder once; later calls reuse it.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            // 1.5 and 2 ms split the step from 1 to 2.5 ms, where a callback that waits for a
            // durable commit ends up under load: what share is answered within 2 ms can be read
            // off one bucket.
            const BUCKETS: &[f64] = &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            // The exporter keeps one description per name, whatever the kind of metric.
            for (name, help) in METRICS_HELP {
                metrics::describe_counter!(*name, *help);
            }
            // A recorder built by hand (not `install`) never drains its histograms on its own:
            // every observation would be kept until the next scrape, which is unbounded memory
            // when nobody scrapes (~8 bytes per rule per callback). Drain them into their buckets
            // every second, as `install` would.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("imrelay-metrics".into())
                .stack_size(64 * 1024)
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    upkeep.run_upkeep();
                });
            Some(handle)
        })
        .clone()
}

pub fn routes(
    app: Arc<App>,
) -> impl Filter<Extract = (Response<Bytes>,), Error = Rejection> + Clone {
    let healthz = warp::get()
        .and(warp::path!("healthz"))
        .map(|| json_response(200, &json!({"status": "ok"})));
    let ready_app = app.clone();
    let readyz = warp::get()
        .and(warp::path!("readyz"))
        .map(move || readiness(&ready_app));
    let metrics = warp::get().and(warp::path!("metrics")).map(move || {
        let text = metrics_handle().map(|h| h.render()).unwrap_or_default();
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Bytes::from(text))
            .expect("static response parts are valid")
    });
    healthz.or(readyz).unify().or(metrics).unify()
}

fn readiness(app: &App) -> Response<Bytes> {
    let set = app.rules.current();
    let rules: Vec<_> = set
        .rules
        .iter()
        .map(|r| {
            json!({
                "file": r.path.display().to_string(),
                "loaded_at_ms": r.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            })
        })
        .collect();
    let storage = match app.outbox.counts() {
        Ok((pending, dead)) => json!({"state": "open", "pending": pending, "dead_letters": dead}),
        Err(e) => json!({"state": "error", "error": e.to_string()}),
    };
    let storage_ok = storage["state"] == "open";
    let queued = app.dispatcher.queued_bytes();
    let mut destinations: Vec<_> = app
        .config
        .destinations
        .values()
        .map(|d| json!({"name": d.name, "format": format!("{:?}", d.format).to_lowercase(), "queued_bytes": queued.get(&d.name).copied().unwrap_or(0)}))
        .collect();
    destinations.push(json!({"name": crate::config::STDOUT_DESTINATION, "format": "json", "queued_bytes": queued.get(crate::config::STDOUT_DESTINATION).copied().unwrap_or(0)}));
    let body = json!({
        "ready": storage_ok,
        "rules": rules,
        "problems": set.problems.iter().map(|p| json!({
            "file": p.file, "line": p.line, "column": p.column, "message": p.message,
        })).collect::<Vec<_>>(),
        "storage": storage,
        "destinations": destinations,
    });
    json_response(if storage_ok { 200 } else { 503 }, &body)
}
