//! The durable outbox: every delivery a callback produces is on disk before its 200 goes out.
//!
//! Storage is redb (pure Rust, fsync on every commit, real transactions), on a backend that
//! makes each commit one sequential journal write (`journal.rs`). One writer thread owns all
//! writes and commits them in batches (group commit): concurrent callbacks share one fsync,
//! which is what makes durability affordable at thousands of callbacks a second. Delivery
//! workers read rows directly; they report outcomes back to the writer, which stores attempt
//! counts and next-attempt times so backoff survives a restart.
//!
//! A failed commit (an I/O error, a full disk) leaves redb refusing every later transaction
//! until the database is opened again. The writer then closes it and reopens it (the journal is
//! replayed, and redb repairs it from the last good commit), at most every [`REOPEN_EVERY`],
//! and stays alive throughout: meanwhile callbacks that need storage get a 503 (Tencent sends
//! them again) and delivery outcomes are kept and committed once storage is back, so an outage
//! delays but loses nothing.

mod journal;
mod row;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

pub use row::{Attempt, Row};

const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
/// (the event's own time, event id) → when it was first stored, for dropping a callback
/// Tencent sends twice. A repeated callback has the same body, so the same time and id. Keyed
/// by time first, inserts land at the end of the tree and expiry is a range delete: keyed by
/// the id alone (a hash), every insert dirtied a random page, which cost ~40 µs of CPU per
/// forwarded event in the load benchmark (11,086 → 16,519 events/s without dedupe writes).
const SEEN_AT: TableDefinition<(u64, &str), u64> = TableDefinition::new("seen_at");
/// Event id → when it was first stored: for events without a usable time of their own.
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
/// (when, event id): the [`SEEN`] entries by age, so expiry is a range delete.
const SEEN_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("seen_by_time");

/// Most operations the writer folds into one commit.
const MAX_BATCH: usize = 1024;

/// How often the writer tries to reopen storage after a failure. Each try may run a repair, so
/// a lasting fault (a full disk) must not turn every incoming callback into one.
const REOPEN_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data folder {0} is in use by another imrelay process (stop it first, or use another --data folder)")]
    Locked(PathBuf),
    #[error("storage error: {0}")]
    Storage(String),
    /// One stored row does not decode: a bug or outside damage, not a storage outage.
    #[error("a stored delivery is unreadable")]
    Unreadable,
    /// A commit failed and the database is being reopened; try again shortly.
    #[error("storage is unavailable after an error and is being reopened")]
    Unavailable,
    #[error("the outbox writer has stopped")]
    Closed,
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> StoreError {
        StoreError::Storage(e.into().to_string())
    }
}

/// A delivery to store: where it goes and what it carries.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub destination: String,
    pub webhook_id: String,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// What an attempt sends. A just-stored delivery goes to its lane with it, so the first
/// attempt need not read the row back; later attempts read it from the stored row.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub webhook_id: String,
    pub content_type: Cow<'static, str>,
    pub body: Bytes,
}

/// A delivery that is stored and waiting: what a delivery worker needs to schedule it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub size: u64,
}

/// The answer to an enqueue.
#[derive(Debug)]
pub enum Enqueued {
    /// Stored; schedule these (in the order given).
    Stored(Vec<(String, Queued, Outgoing)>),
    /// The same event was stored within the dedupe window; nothing new was stored.
    Duplicate,
}

enum Op {
    Enqueue {
        event_id: String,
        event_time_ms: u64,
        deliveries: Vec<NewDelivery>,
        reply: oneshot::Sender<Result<Enqueued, StoreError>>,
    },
    Done {
        seq: u64,
    },
    Retry {
        seq: u64,
        attempt: Attempt,
        next_attempt_ms: u64,
    },
    Dead {
        seq: u64,
        attempt: Attempt,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
}

impl Op {
    /// Done, retry and dead-letter report deliveries that already happened: if their commit
    /// fails they are kept for the next one rather than dropped.
    fn is_outcome(&self) -> bool {
        matches!(self, Op::Done { .. } | Op::Retry { .. } | Op::Dead { .. })
    }
}

/// The open database, shared by the writer and the readers. The writer empties it when a
/// commit fails and fills it again once the database is reopened; redb cannot open a file that
/// is still open, so nobody may keep the database beyond one short read.
#[derive(Clone, Default)]
struct Slot(Arc<RwLock<Option<Arc<Database>>>>);

impl Slot {
    fn get(&self) -> Option<Arc<Database>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, db: Option<Arc<Database>>) -> Option<Arc<Database>> {
        let mut slot = self.0.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *slot, db)
    }
}

/// Opens the database, at start-up and again after a failure: the file in the data folder, or
/// in tests a backend that fails on demand.
type Opener = Box<dyn Fn() -> Result<Database, StoreError> + Send>;

/// Handle to the outbox; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    slot: Slot,
    ops: std_mpsc::Sender<Op>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Outbox {
    /// Opens (or creates) `dir/outbox.redb` and starts the writer thread.
    pub fn open(dir: &Path, dedupe_window: Duration) -> Result<Outbox, StoreError> {
        let dir = dir.to_path_buf();
        Outbox::open_with(Box::new(move || open_db(&dir)), dedupe_window)
    }

    fn open_with(opener: Opener, dedupe_window: Duration) -> Result<Outbox, StoreError> {
        let db = opener()?;
        {
            let w = db.begin_write()?;
            w.open_table(PENDING)?;
            w.open_table(DEAD)?;
            w.open_table(SEEN_AT)?;
            w.open_table(SEEN)?;
            w.open_table(SEEN_BY_TIME)?;
            w.commit()?;
        }
        let next_seq = first_free_seq(&db)?;
        let (ops, rx) = std_mpsc::channel();
        let slot = Slot::default();
        slot.replace(Some(Arc::new(db)));
        let writer = Writer {
            slot: slot.clone(),
            opener,
            next_seq,
            dedupe_window_ms: dedupe_window.as_millis() as u64,
            last_prune_ms: 0,
            last_reopen: None,
            carried: Vec::new(),
            commit_duration: metrics::histogram!("imrelay_outbox_commit_seconds"),
        };
        std::thread::Builder::new()
            .name("imrelay-outbox".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Storage(format!("cannot start the outbox writer: {e}")))?;
        Ok(Outbox { slot, ops })
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.slot.get().ok_or(StoreError::Unavailable)
    }

    /// Stores the deliveries of one event durably, or finds it is a duplicate. `event_time_ms`
    /// is the event's own time (`event_time`, 0 when it has none).
    pub async fn enqueue(
        &self,
        event_id: String,
        event_time_ms: u64,
        deliveries: Vec<NewDelivery>,
    ) -> Result<Enqueued, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::Enqueue {
                event_id,
                event_time_ms,
                deliveries,
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Every stored delivery, by destination, for scheduling at start-up.
    pub fn pending(&self) -> Result<Vec<(String, Queued)>, StoreError> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(PENDING)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let row = Row::decode(v.value())?;
            out.push((
                row.destination.clone(),
                Queued {
                    seq: k.value(),
                    attempts: row.attempts,
                    next_attempt_ms: row.next_attempt_ms,
                    size: row.body.len() as u64,
                },
            ));
        }
        Ok(out)
    }

    /// Reads one waiting delivery; `None` if it is no longer pending.
    pub fn load(&self, seq: u64) -> Result<Option<Row>, StoreError> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(PENDING)?;
        let row = t.get(seq)?;
        row.map(|v| Row::decode(v.value())).transpose()
    }

    pub fn done(&self, seq: u64) {
        let _ = self.ops.send(Op::Done { seq });
    }

    pub fn retry(&self, seq: u64, attempt: Attempt, next_attempt_ms: u64) {
        let _ = self.ops.send(Op::Retry {
            seq,
            attempt,
            next_attempt_ms,
        });
    }

    pub fn dead_letter(&self, seq: u64, attempt: Attempt) {
        let _ = self.ops.send(Op::Dead { seq, attempt });
    }

    /// Waits until every operation sent so far is committed.
    pub async fn flush(&self) {
        let (reply, rx) = oneshot::channel();
        if self.ops.send(Op::Flush { reply }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Counts of waiting and dead-lettered deliveries.
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        let r = self.db()?.begin_read()?;
        Ok((r.open_table(PENDING)?.len()?, r.open_table(DEAD)?.len()?))
    }
}

/// The sequence number after every stored one, pending or dead.
fn first_free_seq(db: &Database) -> Result<u64, StoreError> {
    let r = db.begin_read()?;
    let last = |t: redb::ReadOnlyTable<u64, &[u8]>| -> Result<u64, StoreError> {
        Ok(t.last()?.map_or(0, |(k, _)| k.value()))
    };
    Ok(last(r.open_table(PENDING)?)?.max(last(r.open_table(DEAD)?)?) + 1)
}

fn open_db(dir: &Path) -> Result<Database, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        StoreError::Storage(format!(
            "cannot create the data folder {}: {e}",
            dir.display()
        ))
    })?;
    // redb caches up to 1 GiB of pages by default; a sidecar's queue is mostly written once and
    // read once, so a small cache costs little throughput and keeps memory flat. Measured with
    // every event forwarded: peak RSS 66 MB with the default, 31 MB with 8 MiB, 27–31 MB with
    // 6 MiB, 23–27 MB with 4 MiB (which costs up to ~12 % more CPU per event than 8 MiB; the
    // forwarded/ceiling ratio stayed at 0.19–0.20 either way). Since the journal holds the
    // recently written pages, 2 MiB costs nothing measurable: peak 26.3–26.7 MB against
    // 28.6–29.1 MB with 4 MiB, 55–57 against 52–62 µs per event, three interleaved rounds.
    let storage = match journal::Journaled::open(&dir.join("outbox.redb")) {
        Ok(storage) => storage,
        Err(journal::OpenError::Locked) => return Err(StoreError::Locked(dir.to_path_buf())),
        Err(journal::OpenError::Io(e)) => {
            return Err(StoreError::Storage(format!(
                "cannot open the outbox in {}: {e}",
                dir.display()
            )))
        }
    };
    match redb::Builder::new()
        .set_cache_size(2 * 1024 * 1024)
        .create_with_backend(storage)
    {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::Locked(dir.to_path_buf())),
        Err(e) => Err(e.into()),
    }
}

/// Moves dead letters back into the queue (`imrelay replay`), optionally for one destination.
/// Each gets a fresh attempt budget and is due at once. Returns how many moved.
pub fn replay(dir: &Path, destination: Option<&str>) -> Result<usize, StoreError> {
    let db = open_db(dir)?;
    let w = db.begin_write()?;
    let mut moved = 0;
    {
        let mut dead = w.open_table(DEAD)?;
        let mut pending = w.open_table(PENDING)?;
        let mut keys = Vec::new();
        for entry in dead.iter()? {
            let (k, v) = entry?;
            // An unreadable one stays where it is; it must not block replaying the others.
            let wanted = decoded(k.value(), v.value())
                .is_some_and(|row| destination.is_none_or(|d| d == row.destination));
            if wanted {
                keys.push(k.value());
            }
        }
        for seq in keys {
            let Some(mut row) = dead.remove(seq)?.and_then(|v| decoded(seq, v.value())) else {
                continue;
            };
            row.attempts = 0;
            row.next_attempt_ms = 0;
            pending.insert(seq, row.encode().as_slice())?;
            moved += 1;
        }
    }
    w.commit()?;
    Ok(moved)
}

/// Dead letters, for inspection (`imrelay replay --list` and tests).
pub fn dead_letters(dir: &Path) -> Result<Vec<(u64, Row)>, StoreError> {
    let db = open_db(dir)?;
    let r = db.begin_read()?;
    let t = r.open_table(DEAD)?;
    let mut out = Vec::new();
    for entry in t.iter()? {
        let (k, v) = entry?;
        out.push((k.value(), Row::decode(v.value())?));
    }
    Ok(out)
}

struct Writer {
    slot: Slot,
    opener: Opener,
    /// Never handed out twice, not even after a failed commit: a commit that reported an error
    /// may still be found whole when redb repairs the file, and its rows must not be overwritten.
    next_seq: u64,
    dedupe_window_ms: u64,
    last_prune_ms: u64,
    last_reopen: Option<Instant>,
    /// Outcomes whose commit failed, to go first into the next one.
    carried: Vec<Op>,
    /// `imrelay_outbox_commit_seconds`, looked up once.
    commit_duration: metrics::Histogram,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Op>) {
        loop {
            // With outcomes waiting for storage to come back, wake up to retry them even when
            // nothing new arrives.
            let first = if self.carried.is_empty() {
                match rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(REOPEN_EVERY) {
                    Ok(op) => Some(op),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut batch = std::mem::take(&mut self.carried);
            batch.extend(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    /// Applies a batch in one transaction and answers every waiting caller after the commit.
    fn commit(&mut self, batch: Vec<Op>) {
        let started = Instant::now();
        // One answer per stored or duplicate enqueue, in batch order.
        let mut answers: Vec<Enqueued> = Vec::new();
        let result = self
            .database()
            .and_then(|db| self.apply(&db, &batch, &mut answers));
        self.commit_duration.record(started.elapsed().as_secs_f64());
        let mut answers = answers.into_iter();
        let mut flushes = Vec::new();
        for op in batch {
            match op {
                Op::Enqueue { reply, .. } => {
                    let answer = match &result {
                        Ok(()) => Ok(answers.next().unwrap_or(Enqueued::Duplicate)),
                        Err(StoreError::Unavailable) => Err(StoreError::Unavailable),
                        Err(e) => Err(StoreError::Storage(e.to_string())),
                    };
                    let _ = reply.send(answer);
                }
                Op::Flush { reply } => flushes.push(reply),
                op if result.is_err() && op.is_outcome() => self.carried.push(op),
                _ => {}
            }
        }
        match &result {
            Ok(()) => {}
            // Already reported when the database was closed.
            Err(StoreError::Unavailable) => {}
            Err(e) => {
                tracing::error!(error = %e, "outbox commit failed; reopening storage");
                metrics::counter!("imrelay_outbox_errors_total").increment(1);
                self.close();
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }

    /// The open database, reopened first if a failure closed it (at most every
    /// [`REOPEN_EVERY`]).
    fn database(&mut self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.slot.get() {
            return Ok(db);
        }
        if self.last_reopen.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return Err(StoreError::Unavailable);
        }
        self.last_reopen = Some(Instant::now());
        let reopened = (self.opener)().and_then(|db| Ok((first_free_seq(&db)?, db)));
        match reopened {
            Ok((free, db)) => {
                self.next_seq = self.next_seq.max(free);
                let db = Arc::new(db);
                self.slot.replace(Some(db.clone()));
                tracing::info!("storage reopened");
                Ok(db)
            }
            Err(e) => {
                tracing::warn!(error = %e, "storage could not be reopened yet");
                Err(StoreError::Unavailable)
            }
        }
    }

    /// Closes the database after a failed commit: redb refuses every later transaction until
    /// it is opened again, which needs the file closed first.
    fn close(&mut self) {
        let Some(mut db) = self.slot.replace(None) else {
            return;
        };
        // Readers hold it for one short read at most: wait for them to let go.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match Arc::try_unwrap(db) {
                Ok(only) => {
                    drop(only);
                    break;
                }
                // The last reader closes it; reopening fails until then and is tried again.
                Err(_) if Instant::now() > deadline => break,
                Err(shared) => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        self.last_reopen = None;
    }

    /// Writes the whole batch into one transaction and commits it. `answers` gets one entry per
    /// enqueue, in order.
    fn apply(
        &mut self,
        db: &Database,
        batch: &[Op],
        answers: &mut Vec<Enqueued>,
    ) -> Result<(), StoreError> {
        let w = db.begin_write()?;
        {
            let mut pending = w.open_table(PENDING)?;
            let mut dead = w.open_table(DEAD)?;
            let mut seen_at = w.open_table(SEEN_AT)?;
            let mut seen = w.open_table(SEEN)?;
            let mut seen_by_time = w.open_table(SEEN_BY_TIME)?;
            let now = now_ms();
            for op in batch {
                match op {
                    Op::Enqueue { .. } | Op::Flush { .. } => {}
                    Op::Done { seq } => {
                        pending.remove(*seq)?;
                    }
                    Op::Retry {
                        seq,
                        attempt,
                        next_attempt_ms,
                    } => {
                        let row = pending.get(*seq)?.and_then(|v| decoded(*seq, v.value()));
                        // Gone: settled already (a replay race, or a repeated outcome).
                        let Some(mut row) = row else {
                            continue;
                        };
                        row.record(attempt.clone());
                        row.next_attempt_ms = *next_attempt_ms;
                        pending.insert(*seq, row.encode().as_slice())?;
                    }
                    Op::Dead { seq, attempt } => {
                        let Some(bytes) = pending.remove(*seq)?.map(|v| v.value().to_vec()) else {
                            continue;
                        };
                        // An unreadable row is parked as it is: out of the way, not lost.
                        let parked = match decoded(*seq, &bytes) {
                            Some(mut row) => {
                                row.record(attempt.clone());
                                metrics::counter!("imrelay_dead_letters_total", "destination" => row.destination.clone()).increment(1);
                                row.encode()
                            }
                            None => bytes,
                        };
                        dead.insert(*seq, parked.as_slice())?;
                    }
                }
            }
            for op in batch {
                let Op::Enqueue {
                    event_id,
                    event_time_ms,
                    deliveries,
                    ..
                } = op
                else {
                    continue;
                };
                let window = self.dedupe_window_ms;
                let id = event_id.as_str();
                let key = (*event_time_ms, id);
                if window > 0 {
                    // Looked up in both tables: where the first copy went depended on its
                    // arrival time, not on this one's.
                    let keyed = seen_at.get(key)?.map(|v| v.value());
                    let by_id = seen.get(id)?.map(|v| v.value());
                    let recent = |t: &u64| now.saturating_sub(*t) < window;
                    if keyed.iter().chain(by_id.iter()).any(recent) {
                        answers.push(Enqueued::Duplicate);
                        continue;
                    }
                    // An event time within the window of now can key the record (see
                    // `SEEN_AT`); others are kept by id.
                    if event_time_ms.abs_diff(now) <= window {
                        seen_at.insert(key, now)?;
                    } else {
                        if let Some(t) = by_id {
                            seen_by_time.remove((t, id))?;
                        }
                        seen.insert(id, now)?;
                        seen_by_time.insert((now, id), ())?;
                    }
                }
                let mut stored = Vec::with_capacity(deliveries.len());
                for d in deliveries {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    pending.insert(seq, Row::encode_new(d, now).as_slice())?;
                    stored.push((
                        d.destination.clone(),
                        Queued {
                            seq,
                            attempts: 0,
                            next_attempt_ms: 0,
                            size: d.body.len() as u64,
                        },
                        Outgoing {
                            webhook_id: d.webhook_id.clone(),
                            content_type: Cow::Borrowed(d.content_type),
                            body: d.body.clone(),
                        },
                    ));
                }
                answers.push(Enqueued::Stored(stored));
            }
            // Expire dedupe records every second, a bounded number at a time, so that pruning
            // keeps pace with the arrival rate without ever making one commit slow.
            if now.saturating_sub(self.last_prune_ms) >= 1_000 {
                self.last_prune_ms = now;
                let window = self.dedupe_window_ms;
                for (t, id) in expired(&seen_by_time, now.saturating_sub(window))? {
                    seen_by_time.remove((t, id.as_str()))?;
                    seen.remove(id.as_str())?;
                }
                // A record keyed by an event time t was first stored at most one window after
                // t, so it matters until t + 2 windows at most.
                for (t, id) in expired(&seen_at, now.saturating_sub(2 * window))? {
                    seen_at.remove((t, id.as_str()))?;
                }
            }
        }
        w.commit()?;
        Ok(())
    }
}

/// Up to 20,000 keys of a (time, event id) table from before `cutoff`, oldest first.
fn expired<V: redb::Value + 'static>(
    table: &impl ReadableTable<(u64, &'static str), V>,
    cutoff: u64,
) -> Result<Vec<(u64, String)>, StoreError> {
    Ok(table
        .range(..(cutoff, ""))?
        .take(20_000)
        .filter_map(|e| e.ok())
        .map(|(k, _)| {
            let (t, id) = k.value();
            (t, id.to_string())
        })
        .collect())
}

/// A stored row, or `None` when it is unreadable (logged). Callers leave such a row where it is
/// or park it as it is: failing the whole transaction for it would refuse every callback in
/// the batch, or every other replay.
fn decoded(seq: u64, bytes: &[u8]) -> Option<Row> {
    Row::decode(bytes)
        .inspect_err(|e| tracing::error!(seq, error = %e, "stored delivery left as it is"))
        .ok()
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::{BackendError, StorageBackend};

    use super::journal::Journaled;

    use super::*;

    /// The real storage, but its writes fail while `failing` is set, as on a full disk.
    #[derive(Debug)]
    struct Flaky {
        inner: Journaled,
        failing: Arc<AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> std::io::Result<()> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("no space left on device (injected)"));
            }
            Ok(())
        }
    }

    impl StorageBackend for Flaky {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.inner.close()
        }
        fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(s, e)
        }
        fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(s, e)
        }
        fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.query_lock_range(s, e)
        }
    }

    fn flaky_outbox(path: PathBuf, failing: Arc<AtomicBool>) -> Outbox {
        let opener = move || -> Result<Database, StoreError> {
            let inner = Journaled::open(&path).map_err(|e| StoreError::Storage(e.to_string()))?;
            let backend = Flaky {
                inner,
                failing: failing.clone(),
            };
            Ok(redb::Builder::new().create_with_backend(backend)?)
        };
        Outbox::open_with(Box::new(opener), Duration::from_secs(60)).unwrap()
    }

    fn delivery(n: u32) -> (String, Vec<NewDelivery>) {
        let d = NewDelivery {
            destination: "sink".into(),
            webhook_id: format!("msg_{n}"),
            content_type: "application/json",
            body: format!("{{\"n\":{n}}}").into(),
        };
        (format!("event-{n}"), vec![d])
    }

    async fn stored_seq(outbox: &Outbox, n: u32) -> Result<u64, StoreError> {
        let (id, deliveries) = delivery(n);
        match outbox.enqueue(id, now_ms(), deliveries).await? {
            Enqueued::Stored(q) => Ok(q[0].1.seq),
            Enqueued::Duplicate => panic!("event {n} is new"),
        }
    }

    /// Opens the outbox again once the writer of the dropped one has let the file go.
    fn reopen(dir: &Path, window: Duration) -> Outbox {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Outbox::open(dir, window) {
                Err(StoreError::Locked(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                other => return other.unwrap(),
            }
        }
    }

    /// The same event is stored once within the window, whether its record is keyed by its own
    /// time (a current event) or by id (no time, or a time far from now), also after a reopen;
    /// with a window of 0 nothing is deduplicated.
    #[tokio::test]
    async fn duplicates_are_found_by_time_key_and_by_id_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let window = Duration::from_secs(60);
        let now = now_ms();
        // Current, missing, two windows old, in the future beyond the window.
        let times = [now - 1_000, 0, now - 120_000, now + 120_000];
        let stored = |e: &Enqueued| matches!(e, Enqueued::Stored(_));
        {
            let outbox = Outbox::open(dir.path(), window).unwrap();
            for (i, t) in times.iter().enumerate() {
                let (id, d) = delivery(i as u32);
                assert!(stored(
                    &outbox.enqueue(id.clone(), *t, d.clone()).await.unwrap()
                ));
                let again = outbox.enqueue(id, *t, d).await.unwrap();
                assert!(matches!(again, Enqueued::Duplicate), "time {t}");
            }
            // Same id, another time: another event as far as the key goes, unless the id
            // alone was recorded (the time-less one).
            let (id, d) = delivery(0);
            assert!(stored(&outbox.enqueue(id, now - 2_000, d).await.unwrap()));
        }
        let outbox = reopen(dir.path(), window);
        for (i, t) in times.iter().enumerate() {
            let (id, d) = delivery(i as u32);
            let again = outbox.enqueue(id, *t, d).await.unwrap();
            assert!(
                matches!(again, Enqueued::Duplicate),
                "time {t} after reopen"
            );
        }
        drop(outbox);
        let off = reopen(dir.path(), Duration::ZERO);
        let (id, d) = delivery(1);
        assert!(stored(&off.enqueue(id, 0, d).await.unwrap()));
    }

    /// Dedupe records go away once they cannot matter: pruning runs within later commits.
    #[tokio::test]
    async fn dedupe_records_expire() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), Duration::from_millis(100)).unwrap();
        let (timed, d) = delivery(1);
        outbox.enqueue(timed.clone(), now_ms(), d).await.unwrap();
        let (untimed, d) = delivery(2);
        outbox.enqueue(untimed.clone(), 0, d).await.unwrap();
        let recorded = |outbox: &Outbox| {
            let r = outbox.db().unwrap().begin_read().unwrap();
            let by_time = r.open_table(SEEN_AT).unwrap();
            let by_id = r.open_table(SEEN).unwrap();
            let timed_kept = by_time
                .iter()
                .unwrap()
                .any(|e| e.unwrap().0.value().1 == timed);
            (timed_kept, by_id.get(untimed.as_str()).unwrap().is_some())
        };
        assert_eq!(recorded(&outbox), (true, true));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = 100;
        while recorded(&outbox) != (false, false) {
            assert!(
                Instant::now() < deadline,
                "records still there: {:?}",
                recorded(&outbox)
            );
            // Later commits run the pruning.
            let (id, d) = delivery(n);
            n += 1;
            outbox.enqueue(id, now_ms(), d).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A disk that fails and recovers: callbacks are refused meanwhile (never answered as
    /// stored), the writer survives and reopens the database, nothing stored before is lost
    /// and an outcome reported during the outage is committed afterwards.
    #[tokio::test]
    async fn storage_failure_refuses_then_recovers_without_losing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let failing = Arc::new(AtomicBool::new(false));
        let outbox = flaky_outbox(dir.path().join("outbox.redb"), failing.clone());
        let first = stored_seq(&outbox, 1).await.unwrap();
        let second = stored_seq(&outbox, 2).await.unwrap();

        failing.store(true, Ordering::SeqCst);
        let refused = stored_seq(&outbox, 3).await;
        assert!(refused.is_err(), "{refused:?}");
        // Delivered during the outage: the outcome must not be lost.
        outbox.done(first);
        outbox.flush().await;
        assert!(stored_seq(&outbox, 4).await.is_err());

        failing.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        let third = loop {
            match stored_seq(&outbox, 3).await {
                Ok(seq) => break seq,
                Err(e) if Instant::now() < deadline => {
                    assert!(matches!(e, StoreError::Unavailable), "{e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("storage did not come back: {e}"),
            }
        };
        outbox.flush().await;
        let pending: Vec<u64> = outbox.pending().unwrap().iter().map(|q| q.1.seq).collect();
        assert_eq!(pending, vec![second, third]);
        assert!(third > second);
        assert_eq!(outbox.load(second).unwrap().unwrap().body, b"{\"n\":2}");
    }
}
