//! The ceiling for the load benchmark: the least a Tencent callback endpoint can do on warp.
//! It reads the body, parses it as JSON, and answers Tencent's OK; no verification, no rules,
//! no storage. imrelay's throughput is reported as a ratio to this server measured in the same
//! run (`bash bench/load.sh`).
//!
//! `cargo run --release --example ceiling -- 127.0.0.1:9100`

use std::net::SocketAddr;

use warp::http::{Response, StatusCode};
use warp::hyper::body::Bytes;
use warp::Filter;

const OK: &str = r#"{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}"#;
const FAIL: &str =
    r#"{"ActionStatus":"FAIL","ErrorInfo":"body is not a JSON object","ErrorCode":400}"#;

#[tokio::main]
async fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".into())
        .parse()
        .expect("usage: ceiling ADDR");
    let callback = warp::post()
        .and(warp::path("callback"))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::body::content_length_limit(1024 * 1024))
        .and(warp::body::bytes())
        .map(|_query: String, body: Bytes| {
            let parsed = serde_json::from_slice::<serde_json::Value>(&body);
            let (status, answer) = match parsed {
                Ok(v) if v.is_object() => (StatusCode::OK, OK),
                _ => (StatusCode::BAD_REQUEST, FAIL),
            };
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Bytes::from_static(answer.as_bytes()))
                .expect("static response")
        });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    eprintln!("ceiling listening on http://{addr}/callback");
    warp::serve(callback).incoming(listener).run().await;
}
