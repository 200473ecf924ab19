//! A storage backend for redb that turns each commit into one sequential write.
//!
//! redb commits by writing every page it changed back in place and syncing the file. In the
//! forwarded load benchmark that is ~18 pages per commit spread over the file: ~18 separate
//! block-device requests per sync, which on a virtual disk costs ~5× the CPU and the latency
//! of writing the same bytes in one run. Here the pages redb writes stay in memory until it
//! asks for a sync; the sync appends them as one checksummed record to a journal file and
//! syncs that, so each commit is one contiguous write. Every [`SWITCH_BYTES`] of journal (or
//! [`SWITCH_PAGES`] pages held), a background thread copies the held pages into the database
//! file (a checkpoint) and the next journal file takes over. Commits rewrite the same few
//! dozen pages (the header, the allocator state, the hot leaves), so a checkpoint writes each
//! of them once instead of once per commit.
//!
//! Two journal files take turns: one receives commits while the other, the one before, is
//! being checkpointed. A journal is only written over once its checkpoint has been synced, so
//! the database file never holds anything newer than the older journal's records. Opening
//! replays the complete records of both, older first, into the database file, then empties
//! them: a record torn by a crash fails its checksum and ends the replay. The file redb then
//! sees is exactly as it was at one of its syncs, which is more than a plain file promises.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// The unit pages are held in: redb's page size.
const PAGE: u64 = 4096;
/// Journal bytes after which the next journal takes over and the held pages are checkpointed.
const SWITCH_BYTES: u64 = 16 << 20;
/// Pages held in memory after which the same happens (4 MiB), which bounds memory when commits
/// touch many different pages, as when a backlog grows.
const SWITCH_PAGES: usize = 1024;
/// "IMRJ": the start of every journal record.
const MAGIC: u32 = 0x494d_524a;
/// The size of a [`Header`].
const HEADER: usize = 4 + 8 + 8 + 4;

/// What starts a journal record: [`MAGIC`], the journal's generation, the file's length at
/// that sync, and how many pages follow (their numbers, then their contents, then a CRC-32 of
/// everything before it).
struct Header {
    magic: u32,
    generation: u64,
    len: u64,
    count: u32,
}

impl Header {
    fn parse(bytes: &[u8]) -> Header {
        let at = |range: std::ops::Range<usize>| &bytes[range];
        Header {
            magic: u32::from_le_bytes(at(0..4).try_into().unwrap()),
            generation: u64::from_le_bytes(at(4..12).try_into().unwrap()),
            len: u64::from_le_bytes(at(12..20).try_into().unwrap()),
            count: u32::from_le_bytes(at(20..24).try_into().unwrap()),
        }
    }

    fn write(&self, record: &mut Vec<u8>) {
        record.extend_from_slice(&self.magic.to_le_bytes());
        record.extend_from_slice(&self.generation.to_le_bytes());
        record.extend_from_slice(&self.len.to_le_bytes());
        record.extend_from_slice(&self.count.to_le_bytes());
    }

    /// The whole record's size, checksum included.
    fn record_size(&self) -> u64 {
        HEADER as u64 + u64::from(self.count) * (8 + PAGE) + 4
    }
}

/// Why a data folder cannot be opened through the journal.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("another process has the journal open")]
    Locked,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The journaled database file, handed to redb as its storage.
#[derive(Debug)]
pub struct Journaled {
    shared: Arc<Shared>,
    writer: Mutex<Writer>,
}

#[derive(Debug)]
struct Shared {
    main: FileBackend,
    held: Mutex<Held>,
    /// [`SWITCH_PAGES`]; smaller in tests.
    switch_pages: usize,
}

/// Pages written but not yet in the database file.
#[derive(Debug, Default)]
struct Held {
    /// By page number: everything written since the last switch, newest content.
    pages: HashMap<u64, Box<[u8]>>,
    /// Page numbers written since the last sync.
    unsynced: HashSet<u64>,
    /// The pages of the previous journal while a checkpoint copies them into the file.
    checkpointing: Option<Arc<HashMap<u64, Box<[u8]>>>>,
    /// Set by a failed journal write or checkpoint: from then on every operation fails, and
    /// redb's writer reopens the database, which replays the journals.
    failed: Option<String>,
    /// A transaction wrote more pages than may be held: until its sync, writes go straight to
    /// the file, as with a plain file, and the sync then syncs the file and empties the
    /// journals (whose older records must never be replayed over it).
    direct: bool,
}

/// What only the thread that commits touches.
#[derive(Debug)]
struct Writer {
    journals: [File; 2],
    active: usize,
    offset: u64,
    generation: u64,
    /// The file length at the last sync, to tell whether an empty sync changes anything.
    synced_len: u64,
    record: Vec<u8>,
    checkpoint: Option<JoinHandle<io::Result<()>>>,
    /// [`SWITCH_BYTES`]; smaller in tests.
    switch_bytes: u64,
}

fn lock(held: &Mutex<Held>) -> MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

fn journal_path(main: &Path, n: usize) -> PathBuf {
    let mut name = main.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".journal-{n}"));
    main.with_file_name(name)
}

impl Journaled {
    /// Opens (or creates) `path` and its journals next to it, replaying what the journals
    /// hold. Fails with [`OpenError::Locked`] while another process has them open.
    pub fn open(path: &Path) -> Result<Journaled, OpenError> {
        Journaled::open_with(path, SWITCH_BYTES, SWITCH_PAGES)
    }

    fn open_with(
        path: &Path,
        switch_bytes: u64,
        switch_pages: usize,
    ) -> Result<Journaled, OpenError> {
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        let journals = [open(&journal_path(path, 0))?, open(&journal_path(path, 1))?];
        match journals[0].try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(OpenError::Locked),
            Err(TryLockError::Error(e)) => return Err(e.into()),
        }
        let main = FileBackend::new(open(path)?).map_err(|e| io::Error::other(e.to_string()))?;
        // The journals' names must survive a power cut as well as their contents.
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(folder)?.sync_all()?;
        }
        let generation = recover(&main, &journals)?;
        let synced_len = main.len()?;
        Ok(Journaled {
            shared: Arc::new(Shared {
                main,
                held: Mutex::default(),
                switch_pages,
            }),
            writer: Mutex::new(Writer {
                journals,
                active: 0,
                offset: 0,
                generation: generation + 1,
                synced_len,
                record: Vec::new(),
                checkpoint: None,
                switch_bytes,
            }),
        })
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn held(&self) -> Result<MutexGuard<'_, Held>, io::Error> {
        let held = lock(&self.shared.held);
        match &held.failed {
            Some(why) => Err(io::Error::other(format!("journal failed earlier: {why}"))),
            None => Ok(held),
        }
    }

    fn fail(&self, e: &io::Error) {
        lock(&self.shared.held).failed = Some(e.to_string());
    }

    /// Appends what changed since the last sync to the active journal and syncs it; switches
    /// journals when this one is full.
    fn append(&self, w: &mut Writer) -> io::Result<()> {
        let len = self.shared.main.len()?;
        {
            let mut held = self.held()?;
            if held.direct {
                self.shared.main.sync_data()?;
                empty(&w.journals)?;
                w.active = 0;
                w.offset = 0;
                w.generation += 1;
                w.synced_len = len;
                held.direct = false;
                return Ok(());
            }
            if held.unsynced.is_empty() && len == w.synced_len {
                return Ok(());
            }
            let unsynced = std::mem::take(&mut held.unsynced);
            let record = &mut w.record;
            record.clear();
            let header = Header {
                magic: MAGIC,
                generation: w.generation,
                len,
                count: unsynced.len() as u32,
            };
            header.write(record);
            for n in &unsynced {
                record.extend_from_slice(&n.to_le_bytes());
            }
            for n in &unsynced {
                record.extend_from_slice(&held.pages[n]);
            }
            let crc = crc32fast::hash(record);
            record.extend_from_slice(&crc.to_le_bytes());
            held.unsynced = unsynced;
            held.unsynced.clear();
        }
        let sent = self.write_record(w, len);
        // A record as large as a backlog's commit is not kept around for the next one.
        if w.record.capacity() > 1 << 20 {
            w.record = Vec::new();
        }
        sent
    }

    fn write_record(&self, w: &mut Writer, len: u64) -> io::Result<()> {
        let journal = &w.journals[w.active];
        journal.write_all_at(&w.record, w.offset)?;
        journal.sync_data()?;
        w.offset += w.record.len() as u64;
        w.synced_len = len;
        let full = w.offset >= w.switch_bytes
            || lock(&self.shared.held).pages.len() >= self.shared.switch_pages;
        if full {
            self.switch(w)?;
        }
        Ok(())
    }

    /// Hands the held pages to a checkpoint and starts the other journal, unless the previous
    /// checkpoint is still running (its journal is the one the next would write over).
    fn switch(&self, w: &mut Writer) -> io::Result<()> {
        if w.checkpoint.as_ref().is_some_and(|c| !c.is_finished()) {
            return Ok(());
        }
        self.finish_checkpoint(w)?;
        let pages = {
            let mut held = self.held()?;
            let pages = Arc::new(std::mem::take(&mut held.pages));
            held.checkpointing = Some(pages.clone());
            pages
        };
        w.active ^= 1;
        w.offset = 0;
        w.generation += 1;
        // The journal taken over still holds the records of two generations ago. Its first
        // header is cleared for good before anything is written over it: if a power cut tore
        // the next first record, an old record left whole there would look valid and be
        // replayed, turning pages back to what they were two generations ago.
        let next = &w.journals[w.active];
        next.write_all_at(&[0u8; HEADER], 0)?;
        next.sync_data()?;
        let shared = self.shared.clone();
        w.checkpoint = Some(
            std::thread::Builder::new()
                .name("imrelay-checkpoint".into())
                .spawn(move || shared.checkpoint(&pages))?,
        );
        Ok(())
    }

    /// Waits for the running checkpoint, if any, and reports how it ended.
    fn finish_checkpoint(&self, w: &mut Writer) -> io::Result<()> {
        let Some(running) = w.checkpoint.take() else {
            return Ok(());
        };
        let result = running
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the checkpoint thread panicked")));
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// Stops holding pages for the rest of this transaction (see [`Held::direct`]): what is
    /// held goes into the file first, where readers find it once it is no longer held.
    fn go_direct(&self) -> io::Result<()> {
        let mut w = self.writer();
        self.finish_checkpoint(&mut w)?;
        let mut held = self.held()?;
        let len = self.shared.main.len()?;
        for (n, page) in &held.pages {
            write_clipped(&self.shared.main, *n, page, len)?;
        }
        held.pages.clear();
        held.unsynced.clear();
        held.direct = true;
        Ok(())
    }
}

impl Shared {
    /// Copies pages into the database file and syncs it; then they need not be held any more.
    fn checkpoint(&self, pages: &HashMap<u64, Box<[u8]>>) -> io::Result<()> {
        let result = self.copy_in(pages);
        let mut held = lock(&self.held);
        match &result {
            Ok(()) => held.checkpointing = None,
            Err(e) => held.failed = Some(e.to_string()),
        }
        result
    }

    fn copy_in(&self, pages: &HashMap<u64, Box<[u8]>>) -> io::Result<()> {
        let len = self.main.len()?;
        let mut numbers: Vec<u64> = pages.keys().copied().collect();
        numbers.sort_unstable();
        for n in numbers {
            write_clipped(&self.main, n, &pages[&n], len)?;
        }
        self.main.sync_data()
    }
}

/// Writes page `n` into the file, cut at `len`: a page that reaches past the end of the file
/// (a file length that is not a whole number of pages) must not make it longer.
fn write_clipped(main: &FileBackend, n: u64, page: &[u8], len: u64) -> io::Result<()> {
    let at = n * PAGE;
    if at >= len {
        return Ok(());
    }
    let end = (len - at).min(PAGE) as usize;
    main.write(at, &page[..end])
}

/// The pages a byte range covers, as (position in the range, page number, start within the
/// page, length).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize, usize)> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let at = offset + pos as u64;
        let within = (at % PAGE) as usize;
        let step = (PAGE as usize - within).min(len - pos);
        let piece = (pos, at / PAGE, within, step);
        pos += step;
        Some(piece)
    })
}

/// Replays both journals into the file, syncs it and empties the journals. Returns the newest
/// generation seen.
fn recover(main: &FileBackend, journals: &[File; 2]) -> io::Result<u64> {
    let newest = replay_all(main, journals)?;
    empty(journals)?;
    Ok(newest)
}

/// Replays both journals into the file, the older first, and syncs it if anything was
/// replayed. Returns the newest generation seen.
fn replay_all(main: &FileBackend, journals: &[File; 2]) -> io::Result<u64> {
    let mut newest = 0;
    let mut replayed = false;
    // One record at a time: after a crash under load the journals hold tens of megabytes.
    for n in emptying_order(journals)? {
        let generation = scan(&journals[n], |record| {
            replayed = true;
            replay(main, record)
        })?;
        newest = newest.max(generation);
    }
    if replayed {
        main.sync_data()?;
    }
    Ok(newest)
}

/// Writes one record's pages into the file and gives it the length it had at that sync.
fn replay(main: &FileBackend, record: &[u8]) -> io::Result<()> {
    let Header { len, count, .. } = Header::parse(record);
    let count = count as usize;
    let pages = &record[HEADER + 8 * count..];
    if main.len()? < len {
        main.set_len(len)?;
    }
    for i in 0..count {
        let at = HEADER + 8 * i;
        let n = u64::from_le_bytes(record[at..at + 8].try_into().unwrap());
        let page = &pages[i * PAGE as usize..(i + 1) * PAGE as usize];
        write_clipped(main, n, page, len)?;
    }
    main.set_len(len)
}

/// Empties both journals once the file holds everything in them, the one with older records
/// first, each for good before the next: a crash in between must leave the newer one, which
/// replays harmlessly over the file; the older one alone would turn pages back.
fn empty(journals: &[File; 2]) -> io::Result<()> {
    for n in emptying_order(journals)? {
        if journals[n].metadata()?.len() > 0 {
            journals[n].set_len(0)?;
            journals[n].sync_all()?;
        }
    }
    Ok(())
}

/// The journals, the one whose first record is of the older generation first. A journal just
/// switched to still starts with the records it held before, the oldest of all.
fn emptying_order(journals: &[File; 2]) -> io::Result<[usize; 2]> {
    let mut generations = [0u64; 2];
    for (n, journal) in journals.iter().enumerate() {
        let mut header = [0u8; HEADER];
        if journal.metadata()?.len() >= HEADER as u64 {
            journal.read_exact_at(&mut header, 0)?;
            let header = Header::parse(&header);
            if header.magic == MAGIC {
                generations[n] = header.generation;
            }
        }
    }
    Ok(if generations[0] <= generations[1] {
        [0, 1]
    } else {
        [1, 0]
    })
}

/// Hands each complete record at the start of a journal, all of one generation, to `each`
/// (checksum excluded), in order; returns that generation (0 for none).
fn scan(journal: &File, mut each: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<u64> {
    let size = journal.metadata()?.len();
    let mut generation = 0;
    let mut offset = 0u64;
    let mut record = Vec::new();
    loop {
        let mut header = [0u8; HEADER];
        if offset + HEADER as u64 > size {
            break;
        }
        // A read error is not a torn record: it must not end the replay (and then have the
        // journal emptied) as if the records after it did not exist.
        journal.read_exact_at(&mut header, offset)?;
        let header = Header::parse(&header);
        let total = header.record_size();
        let this = header.generation;
        if header.magic != MAGIC || (generation != 0 && this != generation) || offset + total > size
        {
            break;
        }
        record.resize(total as usize, 0);
        journal.read_exact_at(&mut record, offset)?;
        let (body, crc) = record.split_at(total as usize - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            break;
        }
        generation = this;
        each(body)?;
        offset += total;
    }
    Ok(generation)
}

impl StorageBackend for Journaled {
    fn len(&self) -> io::Result<u64> {
        self.shared.main.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let held = self.held()?;
        let is_held = |n: u64| {
            held.pages.contains_key(&n)
                || held
                    .checkpointing
                    .as_ref()
                    .is_some_and(|c| c.contains_key(&n))
        };
        if !pieces(offset, out.len()).any(|(_, n, _, _)| is_held(n)) {
            // Read without the lock: what is not held now is in the file and stays there
            // while any reader can see it (redb never rewrites a page a reader can reach).
            drop(held);
            return self.shared.main.read(offset, out);
        }
        // Page by page: held content where there is some, the file elsewhere, in runs.
        let mut run_start = 0usize;
        for (pos, n, within, step) in pieces(offset, out.len()) {
            let page = held
                .pages
                .get(&n)
                .or_else(|| held.checkpointing.as_ref().and_then(|pages| pages.get(&n)));
            if let Some(page) = page {
                if run_start < pos {
                    self.shared
                        .main
                        .read(offset + run_start as u64, &mut out[run_start..pos])?;
                }
                out[pos..pos + step].copy_from_slice(&page[within..within + step]);
                run_start = pos + step;
            }
        }
        if run_start < out.len() {
            self.shared
                .main
                .read(offset + run_start as u64, &mut out[run_start..])?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut w = self.writer();
        if len < self.shared.main.len()? {
            // Nothing past the new end may be copied in later: let the running checkpoint
            // finish first, then forget held pages beyond it. The records already in the
            // journal are cut at this length on replay, by the next record's length.
            self.finish_checkpoint(&mut w)?;
            let mut held = self.held()?;
            let first_gone = len.div_ceil(PAGE);
            held.pages.retain(|n, _| *n < first_gone);
            held.unsynced.retain(|n| *n < first_gone);
        }
        self.shared.main.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut w = self.writer();
        let result = self.append(&mut w);
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut held = self.held()?;
        if !held.direct && held.pages.len() >= self.shared.switch_pages * 2 {
            drop(held);
            self.go_direct()?;
            held = self.held()?;
        }
        if held.direct {
            drop(held);
            return self.shared.main.write(offset, data);
        }
        let held = &mut *held;
        for (pos, n, within, step) in pieces(offset, data.len()) {
            if !held.pages.contains_key(&n) {
                let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
                if step < PAGE as usize {
                    // Part of a page: start from what it holds now.
                    let known = held.checkpointing.as_ref().and_then(|c| c.get(&n));
                    match known {
                        Some(known) => page.copy_from_slice(known),
                        None => {
                            let len = self.shared.main.len()?;
                            let end = (len.saturating_sub(n * PAGE)).min(PAGE) as usize;
                            self.shared.main.read(n * PAGE, &mut page[..end])?;
                        }
                    }
                }
                held.pages.insert(n, page);
            }
            held.unsynced.insert(n);
            let page = held.pages.get_mut(&n).expect("inserted above");
            page[within..within + step].copy_from_slice(&data[pos..pos + step]);
        }
        Ok(())
    }

    /// Copies everything held into the file, so that a cleanly closed database is whole
    /// without its journals, and lets go of the lock. After a failure, or with writes that were
    /// never synced (a commit that failed), the file is left alone: the next open replays the
    /// journals, which hold exactly the synced commits.
    fn close(&self) -> io::Result<()> {
        let mut w = self.writer();
        let result = self.finish_checkpoint(&mut w).and_then(|()| {
            let pages = {
                let mut held = self.held()?;
                if !held.unsynced.is_empty() || held.direct {
                    return Ok(());
                }
                std::mem::take(&mut held.pages)
            };
            self.shared.copy_in(&pages)?;
            empty(&w.journals)?;
            w.offset = 0;
            Ok(())
        });
        let _ = w.journals[0].unlock();
        let closed = self.shared.main.close();
        result.and(closed)
    }

    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.main.try_lock_range(s, e)
    }

    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.main.try_lock_shared_range(s, e)
    }

    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.shared.main.lock_range(s, e)
    }

    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.shared.main.lock_shared_range(s, e)
    }

    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.shared.main.unlock_range(s, e)
    }

    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.main.query_lock_range(s, e)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

    use super::*;

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    /// A journal's complete records and their generation.
    fn records(journal: &File) -> io::Result<(u64, Vec<Vec<u8>>)> {
        let mut out = Vec::new();
        let generation = scan(journal, |record| {
            out.push(record.to_vec());
            Ok(())
        })?;
        Ok((generation, out))
    }

    /// Switches every ~64 KiB of journal, so that a few hundred commits go through many
    /// checkpoints and both journals.
    fn open(dir: &Path) -> Database {
        let storage = Journaled::open_with(&dir.join("db"), 64 << 10, 64).unwrap();
        redb::Builder::new().create_with_backend(storage).unwrap()
    }

    fn value(i: u64) -> Vec<u8> {
        vec![(i % 251) as u8; 300 + (i as usize * 37) % 2_500]
    }

    /// Commit `i` adds row `i` and removes row `i - 5` when `i` is odd: pages are written,
    /// freed and reused, as in the outbox.
    fn commit(db: &Database, model: &mut BTreeMap<u64, Vec<u8>>, i: u64) {
        let w = db.begin_write().unwrap();
        {
            let mut t = w.open_table(T).unwrap();
            t.insert(i, value(i).as_slice()).unwrap();
            model.insert(i, value(i));
            if i % 2 == 1 && i >= 5 {
                t.remove(i - 5).unwrap();
                model.remove(&(i - 5));
            }
        }
        w.commit().unwrap();
    }

    fn contents(db: &Database) -> BTreeMap<u64, Vec<u8>> {
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        t.iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value(), v.value().to_vec())
            })
            .collect()
    }

    /// The files as a crash would leave them: copied while the database is open, possibly in
    /// the middle of a checkpoint.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for name in ["db", "db.journal-0", "db.journal-1"] {
            std::fs::copy(from.join(name), to.join(name)).unwrap();
        }
    }

    /// The journal holding the newest records.
    fn newest_journal(dir: &Path) -> PathBuf {
        let generation = |n| records(&File::open(journal_path(&dir.join("db"), n)).unwrap());
        let newer = generation(1).unwrap().0 > generation(0).unwrap().0;
        journal_path(&dir.join("db"), usize::from(newer))
    }

    /// Whatever moment the process dies at, what it finds on opening again is exactly what the
    /// last commit left, across checkpoints and journal switches; a last record that is only
    /// partly written counts as not committed.
    #[test]
    fn a_crash_image_opens_as_the_last_commit_left_it() {
        let live = tempfile::tempdir().unwrap();
        let db = open(live.path());
        let mut model = BTreeMap::new();
        let mut before = BTreeMap::new();
        let mut images = 0;
        for i in 0..400u64 {
            before.clone_from(&model);
            commit(&db, &mut model, i);
            if i % 23 != 7 {
                continue;
            }
            images += 1;
            let image = tempfile::tempdir().unwrap();
            crash_image(live.path(), image.path());
            assert_eq!(contents(&open(image.path())), model, "after commit {i}");

            // The same moment, but the last record torn halfway.
            let torn = tempfile::tempdir().unwrap();
            crash_image(live.path(), torn.path());
            let journal = newest_journal(torn.path());
            let (_, records) = records(&File::open(&journal).unwrap()).unwrap();
            let whole: u64 = records.iter().map(|r| r.len() as u64 + 4).sum();
            let last = records.last().map_or(0, |r| r.len() as u64 + 4);
            let file = OpenOptions::new().write(true).open(&journal).unwrap();
            file.set_len(whole - last / 2).unwrap();
            assert_eq!(contents(&open(torn.path())), before, "commit {i} torn");
        }
        assert!(images > 10);
        // It really went through the journals many times (one generation per switch).
        let generation = (0..2)
            .map(|n| {
                let path = journal_path(&live.path().join("db"), n);
                records(&File::open(path).unwrap()).unwrap().0
            })
            .max()
            .unwrap();
        assert!(generation > 20, "only {generation} journal generations");
        drop(db);
    }

    /// The journals are emptied older first: a crash between the two steps leaves the newer
    /// one, and the next open still finds the last commit. Checked at moments where either
    /// journal is the newer one, by carrying out only the first step on a crash image (the
    /// file already holds everything then, as after a replay).
    #[test]
    fn a_crash_while_emptying_the_journals_loses_nothing() {
        let live = tempfile::tempdir().unwrap();
        let db = open(live.path());
        let mut model = BTreeMap::new();
        let mut checked = [false; 2];
        for i in 0..400u64 {
            commit(&db, &mut model, i);
            let journals =
                |dir: &Path| [0, 1].map(|n| File::open(journal_path(&dir.join("db"), n)).unwrap());
            let [first, _] = emptying_order(&journals(live.path())).unwrap();
            let both = journals(live.path()).map(|j| !records(&j).unwrap().1.is_empty());
            if both != [true, true] || checked[first] {
                continue;
            }
            checked[first] = true;
            let image = tempfile::tempdir().unwrap();
            crash_image(live.path(), image.path());
            // Replay both into the file, as an open does, keeping the journals.
            let main = FileBackend::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(image.path().join("db"))
                    .unwrap(),
            )
            .unwrap();
            replay_all(&main, &journals(image.path())).unwrap();
            drop(main);
            // The first step only, then the crash.
            let first_path = journal_path(&image.path().join("db"), first);
            OpenOptions::new()
                .write(true)
                .open(first_path)
                .unwrap()
                .set_len(0)
                .unwrap();
            assert_eq!(contents(&open(image.path())), model, "after commit {i}");
        }
        assert_eq!(checked, [true, true]);
    }

    /// A power cut can tear a record anywhere: here the first record of a new generation in a
    /// journal taken over lands without its first sector or its first page. Before that
    /// record, the journal holds no record that could be replayed, and the torn image opens
    /// as the commit before left it.
    #[test]
    fn a_torn_first_record_never_brings_back_older_records() {
        let live = tempfile::tempdir().unwrap();
        let db = open(live.path());
        let mut model = BTreeMap::new();
        let read = |n| std::fs::read(journal_path(&live.path().join("db"), n)).unwrap();
        let mut before = [read(0), read(1)];
        let mut generations = [0u64; 2];
        let mut torn = 0;
        for i in 0..400u64 {
            let previous = model.clone();
            commit(&db, &mut model, i);
            let now = [read(0), read(1)];
            for n in 0..2 {
                let journal = File::open(journal_path(&live.path().join("db"), n)).unwrap();
                let (generation, held) = records(&journal).unwrap();
                if held.len() == 1 && generation > generations[n] && generations[n] > 0 {
                    // Commit i started journal n over: what it held just before must not be
                    // replayable, whatever part of the new record reaches the disk.
                    let image = tempfile::tempdir().unwrap();
                    std::fs::write(image.path().join("stale"), &before[n]).unwrap();
                    let stale = File::open(image.path().join("stale")).unwrap();
                    assert!(records(&stale).unwrap().1.is_empty(), "commit {i}");
                    for cut in [512, 4096] {
                        let image = tempfile::tempdir().unwrap();
                        crash_image(live.path(), image.path());
                        let mut bytes = now[n].clone();
                        let old = &before[n][..cut.min(before[n].len())];
                        bytes[..old.len()].copy_from_slice(old);
                        std::fs::write(journal_path(&image.path().join("db"), n), bytes).unwrap();
                        assert_eq!(
                            contents(&open(image.path())),
                            previous,
                            "commit {i}, cut {cut}"
                        );
                        torn += 1;
                    }
                }
                generations[n] = generation.max(generations[n]);
            }
            before = now;
        }
        assert!(torn > 10, "only {torn} torn images");
    }

    /// A transaction far larger than the pages held in memory is written through to the file
    /// instead of being held whole, and survives a crash right after its commit.
    #[test]
    fn a_huge_transaction_is_not_held_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Journaled::open_with(&dir.path().join("db"), 64 << 10, 64).unwrap();
        let shared = storage.shared.clone();
        let db = redb::Builder::new()
            .set_cache_size(1 << 20)
            .create_with_backend(storage)
            .unwrap();
        let mut model = BTreeMap::new();
        for i in 0..30 {
            commit(&db, &mut model, i);
        }
        let before = model.clone();
        let w = db.begin_write().unwrap();
        {
            let mut t = w.open_table(T).unwrap();
            for i in 100..2_100u64 {
                let v = vec![(i % 251) as u8; 8_000];
                t.insert(i, v.as_slice()).unwrap();
                model.insert(i, v);
                let held = lock(&shared.held).pages.len();
                assert!(held <= 2 * 64 + 16, "{held} pages held at row {i}");
                if i == 1_500 {
                    // A crash in the middle of it: the commits before are all there.
                    assert!(lock(&shared.held).direct);
                    let image = tempfile::tempdir().unwrap();
                    crash_image(dir.path(), image.path());
                    assert_eq!(contents(&open(image.path())), before);
                }
            }
        }
        w.commit().unwrap();
        let image = tempfile::tempdir().unwrap();
        crash_image(dir.path(), image.path());
        assert_eq!(contents(&open(image.path())), model);
        commit(&db, &mut model, 5_000);
        assert_eq!(contents(&db), model);
    }

    /// A database closed cleanly is whole in its own file: the journals are empty and a plain
    /// redb opens it with everything in it.
    #[test]
    fn a_clean_close_leaves_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        {
            let db = open(dir.path());
            for i in 0..150 {
                commit(&db, &mut model, i);
            }
        }
        for n in 0..2 {
            let journal = journal_path(&dir.path().join("db"), n);
            assert_eq!(std::fs::metadata(journal).unwrap().len(), 0);
        }
        let plain = Database::open(dir.path().join("db")).unwrap();
        assert_eq!(contents(&plain), model);
    }

    /// A second opener is told the folder is in use, and nothing it does disturbs the first.
    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        let mut model = BTreeMap::new();
        commit(&db, &mut model, 1);
        assert!(matches!(
            Journaled::open(&dir.path().join("db")),
            Err(OpenError::Locked)
        ));
        commit(&db, &mut model, 2);
        assert_eq!(contents(&db), model);
    }
}
