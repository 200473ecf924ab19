//! The durable outbox: every delivery a callback produces is on disk before its 200 goes out.
//!
//! Storage is redb (pure Rust, fsync on every commit, real transactions). One writer thread
//! owns all writes and commits them in batches (group commit): concurrent callbacks share one
//! fsync, which is what makes durability affordable at thousands of callbacks a second.
//! Delivery workers read rows directly; they report outcomes back to the writer, which stores
//! attempt counts and next-attempt times so backoff survives a restart.

mod row;

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

pub use row::{Attempt, Row};

const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
/// Event id → when it was first stored, for dropping a callback Tencent sends twice.
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
/// (when, event id): the same entries by age, so expiry is a range delete.
const SEEN_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("seen_by_time");

/// Most operations the writer folds into one commit.
const MAX_BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data folder {0} is in use by another imrelay process (stop it first, or use another --data folder)")]
    Locked(PathBuf),
    #[error("storage error: {0}")]
    Storage(String),
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
    pub body: Vec<u8>,
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
    Stored(Vec<(String, Queued)>),
    /// The same event was stored within the dedupe window; nothing new was stored.
    Duplicate,
}

enum Op {
    Enqueue {
        event_id: String,
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

/// Handle to the outbox; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    db: Arc<Database>,
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
        let db = Arc::new(open_db(dir)?);
        {
            let w = db.begin_write()?;
            w.open_table(PENDING)?;
            w.open_table(DEAD)?;
            w.open_table(SEEN)?;
            w.open_table(SEEN_BY_TIME)?;
            w.commit()?;
        }
        let next_seq = {
            let r = db.begin_read()?;
            let last = |t: redb::ReadOnlyTable<u64, &[u8]>| -> Result<u64, StoreError> {
                Ok(t.last()?.map_or(0, |(k, _)| k.value()))
            };
            last(r.open_table(PENDING)?)?.max(last(r.open_table(DEAD)?)?) + 1
        };
        let (ops, rx) = std_mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            next_seq,
            dedupe_window_ms: dedupe_window.as_millis() as u64,
            last_prune_ms: 0,
        };
        std::thread::Builder::new()
            .name("imrelay-outbox".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Storage(format!("cannot start the outbox writer: {e}")))?;
        Ok(Outbox { db, ops })
    }

    /// Stores the deliveries of one event durably, or finds it is a duplicate.
    pub async fn enqueue(
        &self,
        event_id: String,
        deliveries: Vec<NewDelivery>,
    ) -> Result<Enqueued, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::Enqueue {
                event_id,
                deliveries,
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Every stored delivery, by destination, for scheduling at start-up.
    pub fn pending(&self) -> Result<Vec<(String, Queued)>, StoreError> {
        let r = self.db.begin_read()?;
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
        let r = self.db.begin_read()?;
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
        let r = self.db.begin_read()?;
        Ok((r.open_table(PENDING)?.len()?, r.open_table(DEAD)?.len()?))
    }
}

fn open_db(dir: &Path) -> Result<Database, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        StoreError::Storage(format!(
            "cannot create the data folder {}: {e}",
            dir.display()
        ))
    })?;
    match Database::create(dir.join("outbox.redb")) {
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
            let row = Row::decode(v.value())?;
            if destination.is_none_or(|d| d == row.destination) {
                keys.push(k.value());
            }
        }
        for seq in keys {
            let Some(bytes) = dead.remove(seq)?.map(|v| v.value().to_vec()) else {
                continue;
            };
            let mut row = Row::decode(&bytes)?;
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
    db: Arc<Database>,
    next_seq: u64,
    dedupe_window_ms: u64,
    last_prune_ms: u64,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
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
        let started = std::time::Instant::now();
        let seq_before = self.next_seq;
        // One answer per enqueue, in batch order.
        let mut answers: Vec<Enqueued> = Vec::new();
        let mut flushes = Vec::new();
        let result = (|| -> Result<(), StoreError> {
            let w = self.db.begin_write()?;
            {
                let mut pending = w.open_table(PENDING)?;
                let mut dead = w.open_table(DEAD)?;
                let mut seen = w.open_table(SEEN)?;
                let mut seen_by_time = w.open_table(SEEN_BY_TIME)?;
                let now = now_ms();
                for op in batch.iter() {
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
                            let row = pending.get(*seq)?.map(|v| Row::decode(v.value()));
                            if let Some(row) = row {
                                let mut row = row?;
                                row.record(attempt.clone());
                                row.next_attempt_ms = *next_attempt_ms;
                                pending.insert(*seq, row.encode().as_slice())?;
                            }
                        }
                        Op::Dead { seq, attempt } => {
                            let row = pending.remove(*seq)?.map(|v| Row::decode(v.value()));
                            if let Some(row) = row {
                                let mut row = row?;
                                row.record(attempt.clone());
                                dead.insert(*seq, row.encode().as_slice())?;
                                metrics::counter!("imrelay_dead_letters_total", "destination" => row.destination.clone()).increment(1);
                            }
                        }
                    }
                }
                for op in batch.iter() {
                    let Op::Enqueue {
                        event_id,
                        deliveries,
                        ..
                    } = op
                    else {
                        continue;
                    };
                    let previous = seen.get(event_id.as_str())?.map(|v| v.value());
                    if previous.is_some_and(|t| now.saturating_sub(t) < self.dedupe_window_ms) {
                        answers.push(Enqueued::Duplicate);
                        continue;
                    }
                    if let Some(t) = previous {
                        seen_by_time.remove((t, event_id.as_str()))?;
                    }
                    seen.insert(event_id.as_str(), now)?;
                    seen_by_time.insert((now, event_id.as_str()), ())?;
                    let mut stored = Vec::with_capacity(deliveries.len());
                    for d in deliveries {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        let row = Row::new(d, now);
                        pending.insert(seq, row.encode().as_slice())?;
                        stored.push((
                            d.destination.clone(),
                            Queued {
                                seq,
                                attempts: 0,
                                next_attempt_ms: 0,
                                size: d.body.len() as u64,
                            },
                        ));
                    }
                    answers.push(Enqueued::Stored(stored));
                }
                if now.saturating_sub(self.last_prune_ms) > 60_000 {
                    self.last_prune_ms = now;
                    let cutoff = now.saturating_sub(self.dedupe_window_ms);
                    let expired: Vec<(u64, String)> = seen_by_time
                        .range(..(cutoff, ""))?
                        .take(100_000)
                        .filter_map(|e| e.ok())
                        .map(|(k, _)| {
                            let (t, id) = k.value();
                            (t, id.to_string())
                        })
                        .collect();
                    for (t, id) in expired {
                        seen_by_time.remove((t, id.as_str()))?;
                        seen.remove(id.as_str())?;
                    }
                }
            }
            w.commit()?;
            Ok(())
        })();
        metrics::histogram!("imrelay_outbox_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        let mut stored_answers = answers.into_iter();
        for op in batch {
            match op {
                Op::Enqueue { reply, .. } => {
                    let answer = match &result {
                        Ok(()) => Ok(stored_answers.next().unwrap_or(Enqueued::Duplicate)),
                        Err(e) => Err(StoreError::Storage(e.to_string())),
                    };
                    let _ = reply.send(answer);
                }
                Op::Flush { reply } => flushes.push(reply),
                _ => {}
            }
        }
        if let Err(e) = &result {
            // Nothing of this batch was stored: give the sequence numbers back and say so.
            self.next_seq = seq_before;
            tracing::error!(error = %e, "outbox commit failed");
            metrics::counter!("imrelay_outbox_errors_total").increment(1);
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}
