//! `FilePager`: the `vmo::Pager` of one restored Vmo, over a chain of snapshot files (a base
//! and the diffs over it, newest last).
//!
//! `commit_page(idx)` looks the page up from the newest layer down: the first layer that has an
//! entry wins (a zero entry reads as zeros; a stored page is read from that file and checked
//! against its hash, and the file against its open-time stamp — `file.rs`); a page no layer
//! has reads as zeros (it was never committed when the base was saved).
//!
//! `read_ahead(idx, count)` (the Vmo announces a run it is about to commit: a prefetch, a
//! prefault, a fault-around) reads, per layer, the stored pages of the run — back to back in
//! that file — with one `pread` (and one `fstat`) into the pager's buffer; the `commit_page`
//! calls that follow copy their page from there when the winning layer's slot lies in it, and
//! check its hash exactly as a single read does. The buffer is replaced by the next
//! read-ahead (at most `MAX_READ_AHEAD` pages per layer); a failed read-ahead is dropped and
//! the pages are read one by one (which reports the error).
//!
//! A failed read (I/O error, checksum, changed file) is recorded in the chain's failure list
//! with the typed `SnapshotError` and returned to the Vmo as `vmo::Error::Io`: the page stays
//! uncommitted, the fault thread stops the guest (`VmExit::GuestFault`), and the caller reads
//! the report from `Chain::failures` — the host process keeps running.
//!
//! Invariants: the files are never written (`update_page` / `decommit_page` are no-ops: a
//! restored guest's writes stay in its own frames; the Vmo is created without write-back);
//! calls for one Vmo are serial (the Vmo's page lock), counters are atomics; a page is never
//! handed to the Vmo before its hash matched, whichever read brought it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmo::{Pager, PAGE_BYTES};

use super::error::SnapshotError;
use super::file::{Slot, SnapshotFile};
use super::format::PAGE;

/// Most pages one read-ahead reads from one layer (2 MiB).
pub const MAX_READ_AHEAD: u64 = 512;

/// The files of a restored guest (base first) and what their pagers did.
pub struct Chain {
    pub layers: Vec<SnapshotFile>,
    failures: Mutex<Vec<SnapshotError>>,
    /// Pages read from a file (stored pages) / answered as zeros.
    pub pages_read: AtomicU64,
    pub zero_fills: AtomicU64,
}

impl Chain {
    pub fn new(layers: Vec<SnapshotFile>) -> Arc<Chain> {
        Arc::new(Chain {
            layers,
            failures: Mutex::new(Vec::new()),
            pages_read: AtomicU64::new(0),
            zero_fills: AtomicU64::new(0),
        })
    }

    /// The newest layer that has page `page` of Vmo `vmo` (an index chunk that fails its
    /// checks on first use is the error).
    pub fn lookup(
        &self,
        vmo: u32,
        page: u64,
    ) -> Result<Option<(&SnapshotFile, Slot)>, SnapshotError> {
        Ok(self
            .lookup_layer(vmo, page)?
            .map(|(l, s)| (&self.layers[l], s)))
    }

    /// `lookup`, naming the layer by its position.
    fn lookup_layer(&self, vmo: u32, page: u64) -> Result<Option<(usize, Slot)>, SnapshotError> {
        for (l, f) in self.layers.iter().enumerate().rev() {
            if let Some(s) = f.slot(vmo, page)? {
                return Ok(Some((l, s)));
            }
        }
        Ok(None)
    }

    /// Reads page `page` of Vmo `vmo` through the chain into `buf`.
    pub fn read(&self, vmo: u32, page: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.read_with(vmo, page, buf, &[])
    }

    /// `read`, taking the page from `ahead` (read-ahead buffers) when one holds it.
    fn read_with(
        &self,
        vmo: u32,
        page: u64,
        buf: &mut [u8],
        ahead: &[Ahead],
    ) -> Result<(), SnapshotError> {
        match self.lookup_layer(vmo, page)? {
            Some((layer, Slot::Data { offset, hash })) => {
                match ahead.iter().find_map(|a| a.page(layer, offset)) {
                    Some(bytes) => {
                        buf.copy_from_slice(bytes);
                        SnapshotFile::check_page(vmo, page, hash, buf)?;
                    }
                    None => self.layers[layer].read_page(vmo, page, offset, hash, buf)?,
                }
                self.pages_read.fetch_add(1, Ordering::Relaxed);
            }
            Some((_, Slot::Zero)) | None => {
                buf.fill(0);
                self.zero_fills.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The page reads that failed so far (each stopped the guest that asked).
    pub fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .map(|f| f.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    /// Takes the typed failures recorded so far.
    pub fn take_failures(&self) -> Vec<SnapshotError> {
        self.failures
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default()
    }

    fn record(&self, e: SnapshotError) {
        tracing::error!("snapshot page read failed: {e}");
        if let Ok(mut f) = self.failures.lock() {
            f.push(e);
        }
    }
}

/// The pages one read-ahead brought from one layer: file bytes `[offset, offset + len)`.
struct Ahead {
    layer: usize,
    offset: u64,
    len: u64,
    bytes: Vec<u8>,
}

impl Ahead {
    /// The page at file `offset` of `layer`, if this buffer holds it.
    fn page(&self, layer: usize, offset: u64) -> Option<&[u8]> {
        let rel = offset.checked_sub(self.offset)?;
        (layer == self.layer && rel + PAGE <= self.len)
            .then(|| &self.bytes[rel as usize..(rel + PAGE) as usize])
    }
}

/// The pager of one restored Vmo (`vmo` is its index in the layout).
pub struct FilePager {
    chain: Arc<Chain>,
    vmo: u32,
    /// The last read-ahead's buffers, one per layer that had pages in the run (their byte
    /// vectors are reused by the next read-ahead).
    ahead: Mutex<Vec<Ahead>>,
}

impl FilePager {
    pub fn new(chain: Arc<Chain>, vmo: u32) -> FilePager {
        FilePager {
            chain,
            vmo,
            ahead: Mutex::new(Vec::new()),
        }
    }
}

impl Pager for FilePager {
    fn commit_page(&self, idx: u64, buf: &mut [u8; PAGE_BYTES]) -> vmo::Result<()> {
        let ahead = self.ahead.lock().map_err(|_| vmo::Error::BadState)?;
        self.chain
            .read_with(self.vmo, idx, buf, &ahead)
            .map_err(|e| {
                self.chain.record(e);
                vmo::Error::Io
            })
    }

    fn read_ahead(&self, idx: u64, count: u64) {
        let Ok(mut ahead) = self.ahead.lock() else {
            return;
        };
        let mut spare: Vec<Vec<u8>> = ahead.drain(..).map(|a| a.bytes).collect();
        let end = idx.saturating_add(count.min(MAX_READ_AHEAD));
        for (layer, file) in self.chain.layers.iter().enumerate() {
            // A chunk error is not reported here either: `commit_page` meets it again.
            let Ok(Some((offset, pages))) = file.data_run(self.vmo, idx, end) else {
                continue;
            };
            if pages < 2 {
                continue;
            }
            let len = pages * PAGE;
            let mut bytes = spare.pop().unwrap_or_default();
            bytes.resize(len as usize, 0);
            // A failed read is not an error here: the pages are read one by one instead.
            if file.read_run(offset, &mut bytes).is_ok() {
                ahead.push(Ahead {
                    layer,
                    offset,
                    len,
                    bytes,
                });
            }
        }
    }

    fn commit_overwrite(&self, _idx: u64) -> vmo::Result<()> {
        Ok(())
    }

    fn update_page(&self, _idx: u64) -> vmo::Result<()> {
        Ok(())
    }

    fn decommit_page(&self, _idx: u64, _data: &[u8; PAGE_BYTES]) -> vmo::Result<()> {
        Ok(())
    }
}
