//! Shared set-up for the black-box tests: the real `imrelay` binary as a child process on
//! 127.0.0.1, real rule files in a temporary folder, and a real HTTP sink that records what it
//! receives and answers as a test scripts it.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use warp::Filter;

/// Tencent's documented payloads (copied from the team's shared fixtures; see SOURCES.md there).
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A fixture's bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(FIXTURES).join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The request fixtures (bodies Tencent sends), by file name, with their command.
pub fn request_fixtures() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(FIXTURES).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.contains(".response") {
            continue;
        }
        let body: Value = serde_json::from_slice(&fixture(&name)).unwrap();
        if let Some(cmd) = body.get("CallbackCommand").and_then(Value::as_str) {
            out.push((name, cmd.to_string()));
        }
    }
    out.sort();
    out
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// When the sink got it: timing checks use this rather than when a polling test noticed.
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "sink body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How the sink answers: scripted answers first, then `default_status`; `delay` before each.
#[derive(Debug)]
pub struct Script {
    pub answers: VecDeque<(u16, Option<String>)>,
    pub default_status: u16,
    pub delay: Duration,
}

/// A local HTTP server that records every request (including failed attempts).
#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    /// Every request, in arrival order.
    pub all: Arc<Mutex<Vec<Received>>>,
    pub script: Arc<Mutex<Script>>,
    stop: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
}

impl Sink {
    pub async fn start() -> Sink {
        Sink::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address.
    pub async fn start_on(addr: SocketAddr) -> Sink {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("sink binds");
        Sink::serve(listener)
    }

    /// Brings a destination that was down up on its port (which it kept all along).
    pub fn start_on_down(down: DownAddr) -> Sink {
        Sink::serve(down.socket.listen(1024).expect("sink listens"))
    }

    fn serve(listener: tokio::net::TcpListener) -> Sink {
        let all = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(Script {
            answers: VecDeque::new(),
            default_status: 200,
            delay: Duration::ZERO,
        }));
        let addr = listener.local_addr().unwrap();
        let (all2, script2) = (all.clone(), script.clone());
        let route = warp::any()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(
                move |path: warp::path::FullPath,
                      query: String,
                      headers: warp::http::HeaderMap,
                      body: bytes::Bytes| {
                    let all = all2.clone();
                    let script = script2.clone();
                    async move {
                        let (delay, (status, retry_after)) = {
                            let mut s = script.lock().unwrap();
                            let answer = s.answers.pop_front().unwrap_or((s.default_status, None));
                            (s.delay, answer)
                        };
                        all.lock().unwrap().push(Received {
                            at: Instant::now(),
                            path: path.as_str().to_string(),
                            query,
                            headers: headers
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                                })
                                .collect(),
                            body: body.to_vec(),
                        });
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let mut r = warp::http::Response::builder().status(status);
                        if let Some(ra) = retry_after {
                            r = r.header("retry-after", ra);
                        }
                        r.body(bytes::Bytes::from_static(b"{}")).unwrap()
                    }
                },
            );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            warp::serve(route)
                .incoming(listener)
                .graceful(async move {
                    let _ = rx.await;
                })
                .run(),
        );
        Sink {
            addr,
            all,
            script,
            stop: Arc::new(Mutex::new(Some(tx))),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Queues answers (status, Retry-After) for the next requests.
    pub fn answer(&self, answers: &[(u16, Option<&str>)]) {
        let mut s = self.script.lock().unwrap();
        for (status, ra) in answers {
            s.answers.push_back((*status, ra.map(str::to_string)));
        }
    }

    pub fn set_default(&self, status: u16) {
        self.script.lock().unwrap().default_status = status;
    }

    pub fn set_delay(&self, delay: Duration) {
        self.script.lock().unwrap().delay = delay;
    }

    /// Every request so far, failed attempts included.
    pub fn all(&self) -> Vec<Received> {
        self.all.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.all.lock().unwrap().len()
    }

    /// Waits until at least `n` requests arrived; returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let what = format!("{n} requests at the sink");
        eventually(timeout, &what, || {
            let all = self.all();
            (all.len() >= n).then_some(all)
        })
        .await
    }

    /// Stops listening (the destination is down from now on).
    pub fn stop(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }
}

/// A local address where a destination is down: the port is bound but not listening, so
/// connections to it are refused. The port stays taken until [`Sink::start_on_down`] listens
/// on it: a port merely found free and released could meanwhile be given to any other socket
/// bound to port 0 (a sink or an imrelay of a test running alongside), and the "down"
/// destination would answer.
pub struct DownAddr {
    socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl DownAddr {
    pub fn reserve() -> DownAddr {
        // No SO_REUSEADDR: no other socket can bind this port while it is held.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        DownAddr { socket, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A folder with `imrelay.toml`, `rules/` and `data/` for one imrelay process.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(config: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("imrelay.toml"), config).unwrap();
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rules(&self) -> PathBuf {
        self.path().join("rules")
    }

    pub fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    /// Writes a rule file (atomically: temp file then rename, as editors do).
    pub fn rule(&self, name: &str, text: &str) {
        let tmp = self.rules().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.rules().join(name)).unwrap();
    }

    pub fn remove_rule(&self, name: &str) {
        std::fs::remove_file(self.rules().join(name)).unwrap();
    }

    /// Runs a one-shot subcommand (`check`, `dry-run`, `test`, `replay`) in this workspace.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_imrelay"))
            .args(args)
            .args(["--config", "imrelay.toml"])
            .current_dir(self.path())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Starts `imrelay serve` here.
    pub fn start(&self) -> Imrelay {
        Imrelay::start(self.path())
    }

    /// Starts `imrelay serve` here with these environment variables set.
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Imrelay {
        Imrelay::start_with_env(self.path(), env)
    }
}

/// A running imrelay child process.
pub struct Imrelay {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub stdout: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

impl Imrelay {
    pub fn start(dir: &Path) -> Imrelay {
        Imrelay::start_with_env(dir, &[])
    }

    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Imrelay {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imrelay"))
            .args([
                "serve",
                "--config",
                "imrelay.toml",
                "--listen",
                "127.0.0.1:0",
            ])
            .current_dir(dir)
            .env("RUST_LOG", "info")
            // Proxies only where a test sets them: one in the surroundings would send every
            // delivery through reqwest and leave the direct plain-HTTP path untested.
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("imrelay starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err_lines = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split('/').next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                err_lines.lock().unwrap().push(line);
            }
        });
        let out_lines = stdout.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                out_lines.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!("imrelay did not start: {:?}", stderr.lock().unwrap());
            }
        };
        Imrelay {
            child,
            addr,
            stderr,
            stdout,
            client: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Posts a body with Tencent's usual query for `command` (SdkAppid 888888).
    pub async fn post(&self, command: &str, body: &[u8]) -> (u16, Value) {
        let query = format!(
            "SdkAppid=888888&CallbackCommand={command}&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI"
        );
        self.post_query(&query, body).await
    }

    /// Posts a body with a query string of the test's choosing.
    pub async fn post_query(&self, query: &str, body: &[u8]) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(&format!("/callback?{query}")))
            .body(body.to_vec())
            .send()
            .await
            .expect("imrelay answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "answer is not JSON: {status} {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, json)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Imrelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with one destination `sink` pointing at `url`, plus extra TOML.
pub fn config_with_sink(url: &str, extra: &str) -> String {
    format!(
        "[tencent]\nsdk_app_ids = [888888]\n\n[destinations.sink]\nurl = \"{url}\"\ntimeout_ms = 2000\nbackoff_base_ms = 50\nbackoff_max_ms = 400\n\n{extra}\n"
    )
}

/// An HTTP client for talking to imrelay (rustls needs its crypto provider chosen first).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The value of the first sample of `name` whose labels include every `k="v"` in `labels`.
pub fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let series = l.rsplit_once(' ').map_or("", |(s, _)| s);
            (series == name || series.starts_with(&format!("{name}{{")))
                && labels.iter().all(|kv| series.contains(kv))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
