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

/// Installs the process-wide Prometheus recorder once; later calls reuse it.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            const BUCKETS: &[f64] = &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
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
