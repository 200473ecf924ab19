//! A fast destination for the load benchmark: answers every POST with 200 and counts it;
//! `GET /count` says how many it has received, so the benchmark can check that every forwarded
//! callback arrived.
//!
//! `cargo run --release --example sink -- 127.0.0.1:9200`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use warp::Filter;

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9200".into())
        .parse()
        .expect("usage: sink ADDR");
    // One thread: a destination is a separate service, and this keeps its share of the
    // benchmark machine's two cores small and predictable.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let post =
            warp::post()
                .and(warp::body::bytes())
                .map(move |_body: warp::hyper::body::Bytes| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    warp::reply()
                });
        let count = warp::get()
            .and(warp::path("count"))
            .map(move || received.load(Ordering::Relaxed).to_string());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
        eprintln!("sink listening on http://{addr}");
        warp::serve(count.or(post)).incoming(listener).run().await;
    });
}
