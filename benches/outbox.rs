//! What durability costs: callbacks per second through the whole service (`imrelay::run`, in
//! this process, on 127.0.0.1) with every callback forwarded, so each 200 waits for its fsync'd
//! outbox commit, against the same run where no rule matches and nothing is stored.
//!
//! A third run forwards every callback to a destination that accepts connections and never
//! answers (one delivery at a time, the rest wait): the cost of storing alone, without the
//! delivery traffic that the second run adds on the same cores.
//!
//! `cargo bench --bench outbox`; `OUTBOX_BENCH_SECONDS` (default 5) and `OUTBOX_BENCH_CLIENTS`
//! (default 32 concurrent clients) change the load. The load generator, the server, the
//! delivery lanes and the sink share this machine's cores, so compare the figures of one run
//! (their ratios), not figures from different machines.
//!
//! Measured on the team's 2-core VM (fsync 0.2-0.4 ms, other builds running; 32 clients, eight
//! runs): forwarding off 21-30k callbacks/s, outbox on 3.9-9.5k (typically ~5k), destination
//! stalled 4.8-13.6k; on/off 0.13-0.41, typically ~0.2. Profiles show the two cores busy with
//! HTTP and rules (the writer thread ~16% of samples): with the load generator, the server, the
//! delivery traffic and the sink on two cores, each 200 waits for a shared fsync'd commit, so
//! throughput follows concurrency (128 clients: on 5.1k, stalled 7.6k, off 18.5k).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imrelay::config::{Config, Overrides};
use warp::Filter;

const QUERY: &str = "SdkAppid=888888&CallbackCommand=Group.CallbackAfterSendMsg&contenttype=json";

/// What the rules do with every callback in a run.
#[derive(Clone, Copy, PartialEq)]
enum Forwarding {
    /// No rule matches: nothing is stored or sent.
    Off,
    /// Every callback is stored and delivered to a sink that answers at once.
    Delivered,
    /// Every callback is stored; its destination never answers, so nearly nothing is sent.
    Stalled,
}

/// One run's figures.
struct Figures {
    answered: u64,
    refused: u64,
    elapsed: Duration,
    /// With forwarding on: how long after the load stopped the sink had every delivery.
    drained_after: Option<Duration>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seconds = setting("OUTBOX_BENCH_SECONDS", 5);
    let clients = setting("OUTBOX_BENCH_CLIENTS", 32);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (sink_url, received) = start_sink().await;
        let stalled_url = start_stalled_destination().await;
        let load = Duration::from_secs(seconds);
        let off = measure(Forwarding::Off, &sink_url, &received, load, clients).await;
        let on = measure(Forwarding::Delivered, &sink_url, &received, load, clients).await;
        let stored = measure(Forwarding::Stalled, &stalled_url, &received, load, clients).await;
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("outbox bench: {clients} clients, {seconds} s per run, {cores} cores");
        println!(
            "  this disk: {:.2} ms per fsync (each outbox commit waits for one)",
            fsync_ms()
        );
        for (name, f) in [
            ("forwarding off (nothing stored)", &off),
            ("outbox on (stored and delivered)", &on),
            ("outbox on, destination stalled", &stored),
        ] {
            println!(
                "  {name:<38} {:>9.0} callbacks/s  ({} answered 200, {} refused)",
                f.rate(),
                f.answered,
                f.refused
            );
        }
        if let Some(d) = on.drained_after {
            println!(
                "  every forwarded callback was at the sink {:.2} s after the load stopped",
                d.as_secs_f64()
            );
        }
        println!("  ratio on/off: {:.2}", on.rate() / off.rate());
        println!("  ratio stalled/off: {:.2}", stored.rate() / off.rate());
    });
}

/// The mean time of a 4 KiB write and `fdatasync` in a temporary folder: the floor under every
/// outbox commit, and the figure that decides how far group commit has to stretch.
fn fsync_ms() -> f64 {
    use std::io::{Seek, Write};
    let mut file = tempfile::tempfile().expect("temp file");
    let page = [7u8; 4096];
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        file.rewind().expect("seek");
        file.write_all(&page).expect("write");
        file.sync_data().expect("fsync");
    }
    started.elapsed().as_secs_f64() * 1000.0 / rounds as f64
}

/// A destination that answers 204 at once and counts what it got.
async fn start_sink() -> (String, Arc<AtomicU64>) {
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let route = warp::body::bytes().map(move |_body: bytes::Bytes| {
        counter.fetch_add(1, Ordering::Relaxed);
        warp::http::StatusCode::NO_CONTENT
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("sink binds");
    let addr = listener.local_addr().expect("sink address");
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (format!("http://{addr}/in"), received)
}

/// A destination that accepts connections and never reads or answers them.
async fn start_stalled_destination() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("stalled destination binds");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            held.push(connection);
        }
    });
    format!("http://{addr}/in")
}

/// Starts imrelay in a fresh folder, drives it with `clients` concurrent clients for `load`,
/// then (delivered) waits until the sink has every delivery, and stops it.
async fn measure(
    forwarding: Forwarding,
    sink_url: &str,
    received: &AtomicU64,
    load: Duration,
    clients: u64,
) -> Figures {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_workspace(dir.path(), sink_url, forwarding);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("imrelay binds");
    let url = format!(
        "http://{}/callback?{QUERY}",
        listener.local_addr().expect("address")
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(imrelay::run(config, listener, async move {
        let _ = stopped.await;
    }));

    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/group-after-send-text.json"),
    )
    .expect("fixture");
    // Every callback differs (its MsgSeq), so none is dropped as a duplicate.
    let (before, after) = template
        .split_once("\"MsgSeq\": 123")
        .expect("the fixture has MsgSeq 123");
    let (before, after) = (Arc::new(before.to_string()), Arc::new(after.to_string()));
    let next = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let delivered_before = received.load(Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + load;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let client = reqwest::Client::new();
        let (url, before, after) = (url.clone(), before.clone(), after.clone());
        let (next, answered, refused) = (next.clone(), answered.clone(), refused.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let body = format!("{before}\"MsgSeq\": {n}{after}");
                match client.post(&url).body(body).send().await {
                    Ok(r) if r.status() == 200 => answered.fetch_add(1, Ordering::Relaxed),
                    _ => refused.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let answered = answered.load(Ordering::Relaxed);

    let drained_after = if forwarding == Forwarding::Delivered {
        let load_stopped = Instant::now();
        while received.load(Ordering::Relaxed) - delivered_before < answered {
            assert!(
                load_stopped.elapsed() < Duration::from_secs(120),
                "deliveries did not drain"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(load_stopped.elapsed())
    } else {
        None
    };
    let _ = stop.send(());
    server.await.expect("imrelay task").expect("imrelay ran");
    Figures {
        answered,
        refused: refused.load(Ordering::Relaxed),
        elapsed,
        drained_after,
    }
}

/// `imrelay.toml` and one rule that forwards every callback, or one that never matches (the
/// same rule work, nothing stored). A stalled destination gets one delivery at a time, with a
/// timeout longer than the run; shutdown gives up on it after a second.
fn write_workspace(dir: &Path, sink_url: &str, forwarding: Forwarding) -> Config {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).expect("rules folder");
    let condition = match forwarding {
        Forwarding::Off => "event.text == \"never\"",
        Forwarding::Delivered | Forwarding::Stalled => "true",
    };
    let lane = match forwarding {
        Forwarding::Stalled => "concurrency = 1\ntimeout_ms = 600000",
        _ => "concurrency = 32",
    };
    std::fs::write(
        rules.join("bench.rhai"),
        format!("if {condition} {{ forward(\"sink\"); }}\n"),
    )
    .expect("rule");
    let file = dir.join("imrelay.toml");
    let toml = format!(
        "[server]\nshutdown_grace_ms = 1000\n[tencent]\nsdk_app_ids = [888888]\n\
         [rules]\ndir = {rules:?}\n[storage]\ndir = {data:?}\n\
         [destinations.sink]\nurl = \"{sink_url}\"\n{lane}\n",
        rules = rules.display().to_string(),
        data = dir.join("data").display().to_string(),
    );
    std::fs::write(&file, toml).expect("config");
    Config::load_with_env(Some(&file), &Overrides::default(), &[]).expect("valid config")
}
