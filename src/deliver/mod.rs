//! Delivery: one lane (a task) per destination, each with its own schedule, concurrency limit
//! and rate limit, so a slow or dead destination only ever delays itself.
//!
//! Lanes hold small descriptors ([`Queued`]); the body is read from the outbox when an attempt
//! starts, except for a delivery's first attempt right after it was stored, which gets its body
//! from the callback (an [`Outgoing`], within [`FRESH_BYTES`] per lane). Every outcome goes back to
//! the outbox writer, so the schedule on disk is always the truth and a restart resumes it.

pub mod format;
mod plain;
pub mod policy;
pub mod sign;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{DestinationConfig, Format, StorageConfig, STDOUT_DESTINATION};
use crate::outbox::{now_ms, Attempt, Outbox, Outgoing, Queued, StoreError};
use policy::{Backoff, Outcome};

/// Each distinct literal URL a rule forwards to gets a lane (a task) that lives as long as the
/// process: a rule building a new URL per event would otherwise grow tasks without bound.
pub const MAX_URL_LANES: usize = 256;

/// Bodies of just-stored deliveries a lane keeps in memory for their first attempt. A lane
/// that falls behind holds at most this much; deliveries beyond it are read from the outbox.
pub const FRESH_BYTES: u64 = 256 * 1024;

pub const USER_AGENT: &str = concat!("imrelay/", env!("CARGO_PKG_VERSION"));

/// How long a delivery waits when its row could not be read (storage is being reopened). Not
/// an attempt: a storage outage must not use up a destination's `max_attempts`.
const STORAGE_WAIT: Duration = Duration::from_secs(1);

/// Why a callback's deliveries cannot be accepted now.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("the queue for destination `{0}` is full")]
    QueueFull(String),
    #[error("forwards already go to {MAX_URL_LANES} distinct literal URLs; `{0}` would be one more (name the destination in the config, or use fewer distinct URLs)")]
    TooManyUrls(String),
    #[error("no destination named `{0}`")]
    Unknown(String),
}

/// The handle ingress and the server use: admits, schedules and shuts down lanes.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    outbox: Outbox,
    destinations: BTreeMap<String, DestinationConfig>,
    storage: StorageConfig,
    lanes: Mutex<HashMap<String, Lane>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Set when shutting down: until when in-flight attempts may finish.
    stop: watch::Sender<Option<tokio::time::Instant>>,
}

#[derive(Clone)]
struct Lane {
    jobs: mpsc::UnboundedSender<(Queued, Option<Outgoing>)>,
    queued_bytes: Arc<AtomicU64>,
    cap: u64,
}

impl Dispatcher {
    pub fn new(
        outbox: Outbox,
        destinations: BTreeMap<String, DestinationConfig>,
        storage: StorageConfig,
    ) -> Dispatcher {
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // Like plain-HTTP deliveries: a 3xx is an answer, not a new address (following a
            // 301 or 302 would resend the POST as a GET without its body).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the HTTP client builds with static settings");
        Dispatcher {
            inner: Arc::new(Inner {
                client,
                outbox,
                destinations,
                storage,
                lanes: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
                stop: watch::channel(None).0,
            }),
        }
    }

    /// The format of a destination a rule named, if it can exist.
    pub fn format_of(&self, name: &str) -> Option<Format> {
        match self.inner.destinations.get(name) {
            Some(d) => Some(d.format),
            None => self.destination(name).map(|d| d.format),
        }
    }

    /// The settings for a destination a rule named, if it can exist.
    fn destination(&self, name: &str) -> Option<DestinationConfig> {
        if let Some(d) = self.inner.destinations.get(name) {
            return Some(d.clone());
        }
        if name == STDOUT_DESTINATION {
            let mut d = DestinationConfig::for_url(
                reqwest::Url::parse("stdout:").expect("static URL"),
                &self.inner.storage,
            );
            d.name = STDOUT_DESTINATION.into();
            return Some(d);
        }
        let url = reqwest::Url::parse(name).ok()?;
        matches!(url.scheme(), "http" | "https")
            .then(|| DestinationConfig::for_url(url, &self.inner.storage))
    }

    /// Refuses when any of these destinations has a full queue.
    pub fn admit<'a>(
        &self,
        destinations: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), AdmitError> {
        for name in destinations {
            let lane = self.lane(name)?;
            if lane.queued_bytes.load(Ordering::Relaxed) >= lane.cap {
                metrics::counter!("imrelay_queue_full_total", "destination" => name.to_string())
                    .increment(1);
                tracing::warn!(destination = name, "queue full: callback refused with 503");
                return Err(AdmitError::QueueFull(name.into()));
            }
        }
        Ok(())
    }

    /// Hands stored deliveries to their lanes, with the body of those just stored.
    pub fn schedule(&self, queued: impl IntoIterator<Item = (String, Queued, Option<Outgoing>)>) {
        for (name, q, fresh) in queued {
            match self.lane(&name) {
                Ok(lane) => {
                    lane.queued_bytes.fetch_add(q.size, Ordering::Relaxed);
                    let _ = lane.jobs.send((q, fresh));
                }
                Err(e) => {
                    // Stored for a destination that is no longer configured (or one URL too
                    // many): park it where `imrelay replay` can bring it back.
                    tracing::warn!(destination = %name, seq = q.seq, "stored delivery cannot be scheduled: dead-lettered: {e}");
                    self.inner.outbox.dead_letter(
                        q.seq,
                        Attempt {
                            at_ms: now_ms(),
                            status: 0,
                            error: e.to_string(),
                        },
                    );
                }
            }
        }
    }

    fn lane(&self, name: &str) -> Result<Lane, AdmitError> {
        let mut lanes = self.inner.lanes.lock().expect("lanes lock");
        if let Some(lane) = lanes.get(name) {
            return Ok(lane.clone());
        }
        let config = self
            .destination(name)
            .ok_or_else(|| AdmitError::Unknown(name.into()))?;
        let literal = |n: &str| n != STDOUT_DESTINATION && !self.inner.destinations.contains_key(n);
        if literal(name) && lanes.keys().filter(|k| literal(k)).count() >= MAX_URL_LANES {
            return Err(AdmitError::TooManyUrls(name.into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let lane = Lane {
            jobs: tx,
            queued_bytes: Arc::new(AtomicU64::new(0)),
            cap: config.max_queue_bytes,
        };
        let worker = Worker {
            backoff: Backoff::new(config.backoff_base, config.backoff_max).unwrap_or_else(|_| {
                Backoff::new(Duration::from_millis(500), Duration::from_secs(600))
                    .expect("static backoff")
            }),
            bucket: config.rate_per_minute.map(TokenBucket::per_minute),
            metrics: LaneMetrics::new(&config.name),
            lane: Attempter {
                inner: self.inner.clone(),
                plain: plain::Pool::for_url(&config.url, config.concurrency).map(Arc::new),
                config: Arc::new(config),
            },
            queued_bytes: lane.queued_bytes.clone(),
        };
        let handle = tokio::spawn(worker.run(rx, self.inner.stop.subscribe()));
        self.inner.tasks.lock().expect("tasks lock").push(handle);
        lanes.insert(name.to_string(), lane.clone());
        Ok(lane)
    }

    /// Stops starting attempts, lets in-flight ones finish until `deadline`, and waits for the
    /// outbox to commit their outcomes. What is left goes out after the next start.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        // `send_replace`, which stores the deadline even while no lane exists: one that a
        // finishing callback starts afterwards must see it and stop too.
        self.inner.stop.send_replace(Some(deadline));
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
        for t in tasks {
            let _ = t.await;
        }
        self.inner.outbox.flush().await;
    }

    /// Bytes waiting per destination, for readiness and metrics.
    pub fn queued_bytes(&self) -> BTreeMap<String, u64> {
        let lanes = self.inner.lanes.lock().expect("lanes lock");
        lanes
            .iter()
            .map(|(k, l)| (k.clone(), l.queued_bytes.load(Ordering::Relaxed)))
            .collect()
    }
}

/// One destination's schedule and in-flight attempts.
struct Worker {
    /// What each attempt gets a (cheap) clone of.
    lane: Attempter,
    backoff: Backoff,
    bucket: Option<TokenBucket>,
    queued_bytes: Arc<AtomicU64>,
    metrics: LaneMetrics,
}

/// A lane's metric handles, looked up once instead of once per delivery.
struct LaneMetrics {
    delivered: metrics::Counter,
    retried: metrics::Counter,
    dead: metrics::Counter,
    duration: metrics::Histogram,
}

impl LaneMetrics {
    fn new(destination: &str) -> LaneMetrics {
        let outcome = |outcome: &'static str| metrics::counter!("imrelay_deliveries_total", "destination" => destination.to_string(), "outcome" => outcome);
        LaneMetrics {
            delivered: outcome("delivered"),
            retried: outcome("retry"),
            dead: outcome("dead"),
            duration: metrics::histogram!("imrelay_delivery_duration_seconds", "destination" => destination.to_string()),
        }
    }
}

/// Due order: earliest first, then oldest.
type Due = Reverse<(u64, u64, u32, u64)>;

impl Worker {
    async fn run(
        mut self,
        mut jobs: mpsc::UnboundedReceiver<(Queued, Option<Outgoing>)>,
        mut stop: watch::Receiver<Option<tokio::time::Instant>>,
    ) {
        let mut heap: BinaryHeap<Due> = BinaryHeap::new();
        // Bodies for first attempts, by sequence number, and their total size.
        let mut fresh: HashMap<u64, Outgoing> = HashMap::new();
        let mut fresh_bytes: u64 = 0;
        let mut in_flight: JoinSet<(Queued, Result<Outcome, StoreError>, Duration)> =
            JoinSet::new();
        let depth =
            metrics::gauge!("imrelay_queue_depth", "destination" => self.lane.config.name.clone());
        loop {
            depth.set((heap.len() + in_flight.len()) as f64);
            let now = now_ms();
            // Start whatever is due, within the concurrency and rate limits.
            let mut wait_ms: Option<u64> = None;
            while in_flight.len() < self.lane.config.concurrency {
                let Some(Reverse((due, _, _, _))) = heap.peek().copied() else {
                    break;
                };
                if due > now {
                    wait_ms = Some(due - now);
                    break;
                }
                if let Some(bucket) = &mut self.bucket {
                    if let Err(wait) = bucket.take() {
                        wait_ms = Some(wait.as_millis() as u64 + 1);
                        break;
                    }
                }
                let Reverse((_, seq, attempts, size)) = heap.pop().expect("peeked");
                let job = Queued {
                    seq,
                    attempts,
                    next_attempt_ms: due,
                    size,
                };
                let body = fresh.remove(&seq);
                if let Some(f) = &body {
                    fresh_bytes -= f.body.len() as u64;
                }
                let lane = self.lane.clone();
                in_flight.spawn(async move {
                    let started = Instant::now();
                    let outcome = lane.attempt(seq, body).await;
                    (job, outcome, started.elapsed())
                });
            }
            let sleep = tokio::time::sleep(Duration::from_millis(wait_ms.unwrap_or(3_600_000)));
            tokio::select! {
                biased;
                // `wait_for`, not `changed`: a lane started after shutdown began (by a callback
                // still finishing) must stop too, though it never sees the change.
                _ = stop.wait_for(Option::is_some) => break,
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok((job, outcome, took)) = done {
                        if let Some(again) = self.finish(job, outcome, took) {
                            heap.push(again);
                        }
                    }
                }
                Some((job, body)) = jobs.recv() => {
                    if let Some(body) = body {
                        let size = body.body.len() as u64;
                        if fresh_bytes + size <= FRESH_BYTES {
                            fresh_bytes += size;
                            fresh.insert(job.seq, body);
                        }
                    }
                    heap.push(Reverse((job.next_attempt_ms, job.seq, job.attempts, job.size)));
                }
                _ = sleep, if wait_ms.is_some() => {}
            }
        }
        // Shutting down: in-flight attempts may finish until the deadline; the rest stays on disk.
        let deadline = (*stop.borrow()).unwrap_or_else(tokio::time::Instant::now);
        while !in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, in_flight.join_next()).await {
                Ok(Some(Ok((job, outcome, took)))) => {
                    self.finish(job, outcome, took);
                }
                Ok(Some(Err(_))) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(destination = %self.lane.config.name, left = in_flight.len(), "shutdown grace over; unfinished deliveries will be retried after restart");
                    in_flight.abort_all();
                    break;
                }
            }
        }
    }

    /// Settles an attempt, or puts the job back unattempted when its row could not be read;
    /// returns the job again when it is to be tried later.
    fn finish(
        &mut self,
        job: Queued,
        outcome: Result<Outcome, StoreError>,
        took: Duration,
    ) -> Option<Due> {
        match outcome {
            Ok(outcome) => self.settle(job, outcome, took),
            Err(e) => {
                tracing::warn!(destination = %self.lane.config.name, seq = job.seq, error = %e, "delivery postponed: its row could not be read");
                let next = now_ms() + STORAGE_WAIT.as_millis() as u64;
                Some(Reverse((next, job.seq, job.attempts, job.size)))
            }
        }
    }

    /// Records an attempt's outcome; returns the job again when it is to be retried.
    fn settle(&mut self, job: Queued, outcome: Outcome, took: Duration) -> Option<Due> {
        let name = &self.lane.config.name;
        self.metrics.duration.record(took.as_secs_f64());
        let outbox = &self.lane.inner.outbox;
        let (status, error, retry_after) = match outcome {
            Outcome::Delivered => {
                outbox.done(job.seq);
                self.queued_bytes.fetch_sub(job.size, Ordering::Relaxed);
                self.metrics.delivered.increment(1);
                return None;
            }
            Outcome::Retry {
                status,
                error,
                after,
            } => (status, error, Some(after)),
            Outcome::Fatal { status, error } => (status, error, None),
        };
        let attempt = Attempt {
            at_ms: now_ms(),
            status,
            error,
        };
        let attempts = job.attempts + 1;
        match retry_after {
            Some(after) if attempts < self.lane.config.max_attempts => {
                let next = now_ms() + self.backoff.delay(job.attempts, after).as_millis() as u64;
                tracing::debug!(destination = %name, seq = job.seq, attempts, error = %attempt.error, "delivery failed; will retry");
                outbox.retry(job.seq, attempt, next);
                self.metrics.retried.increment(1);
                Some(Reverse((next, job.seq, attempts, job.size)))
            }
            _ => {
                tracing::warn!(destination = %name, seq = job.seq, attempts, error = %attempt.error, "delivery dead-lettered");
                outbox.dead_letter(job.seq, attempt);
                self.queued_bytes.fetch_sub(job.size, Ordering::Relaxed);
                self.metrics.dead.increment(1);
                None
            }
        }
    }
}

/// What an attempt needs of its lane.
#[derive(Clone)]
struct Attempter {
    inner: Arc<Inner>,
    config: Arc<DestinationConfig>,
    /// Connections for a plain-HTTP destination; `None`: reqwest sends.
    plain: Option<Arc<plain::Pool>>,
}

impl Attempter {
    /// One attempt: read the stored delivery (unless its body came with it), send it, classify
    /// the answer. An error means the row could not be read and nothing was sent.
    async fn attempt(&self, seq: u64, fresh: Option<Outgoing>) -> Result<Outcome, StoreError> {
        if let Some(fresh) = fresh {
            return Ok(self.deliver(fresh).await);
        }
        let row = match self.inner.outbox.load(seq) {
            Ok(Some(row)) => row,
            // Already settled (for example by a replay race): nothing to send.
            Ok(None) => return Ok(Outcome::Delivered),
            // It will never decode: park it with the dead letters instead of retrying forever.
            Err(StoreError::Unreadable) => {
                return Ok(Outcome::Fatal {
                    status: 0,
                    error: StoreError::Unreadable.to_string(),
                })
            }
            Err(e) => return Err(e),
        };
        let stored = Outgoing {
            webhook_id: row.webhook_id,
            content_type: row.content_type.into(),
            body: row.body.into(),
        };
        Ok(self.deliver(stored).await)
    }

    /// Sends a delivery once (or prints it, for `stdout`) and classifies the answer.
    async fn deliver(&self, row: Outgoing) -> Outcome {
        if self.config.name == STDOUT_DESTINATION {
            return print_stdout(&row.body);
        }
        self.send(row).await
    }

    /// Sends a delivery once and classifies the answer.
    async fn send(&self, row: Outgoing) -> Outcome {
        let config = &*self.config;
        let timestamp = now_ms() / 1000;
        let mut url = config.url.clone();
        let mut body = row.body;
        if let Some(secret) = &config.secret {
            match config.format {
                Format::DingTalk => {
                    let ts = now_ms();
                    url.query_pairs_mut()
                        .append_pair("timestamp", &ts.to_string())
                        .append_pair("sign", &sign::dingtalk(secret, ts));
                }
                Format::Lark => body = format::sign_lark_body(&body, secret, timestamp).into(),
                _ => {}
            }
        }
        let signature = config
            .secret
            .as_ref()
            .map(|secret| sign::standard_webhooks(secret, &row.webhook_id, timestamp, &body));
        let timestamp = timestamp.to_string();
        let mut headers: Vec<(&str, &str)> = vec![
            ("content-type", row.content_type.as_ref()),
            ("webhook-id", row.webhook_id.as_str()),
            ("webhook-timestamp", timestamp.as_str()),
        ];
        if let Some(signature) = &signature {
            headers.push(("webhook-signature", signature.as_str()));
        }
        headers.extend(config.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let answer = match &self.plain {
            Some(pool) => {
                let target = match url.query() {
                    Some(q) => format!("{}?{q}", url.path()),
                    None => url.path().to_string(),
                };
                pool.post(&target, &headers, body, config.timeout).await
            }
            None => self.send_reqwest(url, &headers, body).await,
        };
        match answer {
            Ok(answer) => policy::classify(answer.status, answer.retry_after.as_deref()),
            Err(error) => Outcome::Retry {
                status: 0,
                error,
                after: None,
            },
        }
    }

    /// The same exchange through reqwest: for HTTPS, credentials in the URL, and proxies.
    async fn send_reqwest(
        &self,
        url: reqwest::Url,
        headers: &[(&str, &str)],
        body: bytes::Bytes,
    ) -> Result<plain::Answer, String> {
        let timeout = self.config.timeout;
        let mut request = self.inner.client.post(url).timeout(timeout);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        match request.body(body).send().await {
            Ok(mut response) => {
                let answer = plain::Answer::of(response.status(), response.headers());
                // Read the body (within a second, dropping it as it comes) so the connection
                // goes back to the pool.
                let drained = async { while let Ok(Some(_)) = response.chunk().await {} };
                let _ = tokio::time::timeout(plain::BODY_TIMEOUT, drained).await;
                Ok(answer)
            }
            Err(e) if e.is_timeout() => Err(format!("timed out after {} ms", timeout.as_millis())),
            Err(e) => Err(format!("{e}")),
        }
    }
}

fn print_stdout(body: &[u8]) -> Outcome {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_all(body)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => Outcome::Delivered,
        Err(e) => Outcome::Retry {
            status: 0,
            error: format!("stdout: {e}"),
            after: None,
        },
    }
}

/// A token bucket: `burst` deliveries at once, refilled at the platform's rate.
struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: Instant,
}

impl TokenBucket {
    /// Bursts are five seconds' worth of the rate, but at most 3: a burst plus a second of
    /// refill must stay within Lark's 5 a second (it allows 100 a minute), and Slack tolerates
    /// only short bursts over its 1 a second.
    fn per_minute(rate: u32) -> TokenBucket {
        let burst = (rate as f64 / 12.0).floor().clamp(1.0, 3.0);
        TokenBucket {
            tokens: burst,
            burst,
            per_sec: rate as f64 / 60.0,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec)
            .min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}
