//! `FilePager`: the `vmo::Pager` of one restored Vmo, over a chain of snapshot files (a base
//! and the diffs over it, newest last).
//!
//! `commit_page(idx)` looks the page up from the newest layer down: the first layer that has an
//! entry wins (a zero entry reads as zeros; a stored page is read from that file and checked
//! against its hash, and the file against its open-time stamp — `file.rs`); a page no layer
//! has reads as zeros (it was never committed when the base was saved).
//!
//! A failed read (I/O error, checksum, changed file) is recorded in the chain's failure list
//! with the typed `SnapshotError` and returned to the Vmo as `vmo::Error::Io`: the page stays
//! uncommitted, the fault thread stops the guest (`VmExit::GuestFault`), and the caller reads
//! the report from `Chain::failures` — the host process keeps running.
//!
//! Invariants: the files are never written (`update_page` / `decommit_page` are no-ops: a
//! restored guest's writes stay in its own frames; the Vmo is created without write-back);
//! calls for one Vmo are serial (the Vmo's page lock), counters are atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmo::{Pager, PAGE_BYTES};

use super::error::SnapshotError;
use super::file::{Slot, SnapshotFile};

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

    /// The newest layer that has page `page` of Vmo `vmo`.
    pub fn lookup(&self, vmo: u32, page: u64) -> Option<(&SnapshotFile, Slot)> {
        self.layers
            .iter()
            .rev()
            .find_map(|f| f.slot(vmo, page).map(|s| (f, s)))
    }

    /// Reads page `page` of Vmo `vmo` through the chain into `buf`.
    pub fn read(&self, vmo: u32, page: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        match self.lookup(vmo, page) {
            Some((file, Slot::Data { offset, hash })) => {
                file.read_page(vmo, page, offset, hash, buf)?;
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

/// The pager of one restored Vmo (`vmo` is its index in the layout).
pub struct FilePager {
    chain: Arc<Chain>,
    vmo: u32,
}

impl FilePager {
    pub fn new(chain: Arc<Chain>, vmo: u32) -> FilePager {
        FilePager { chain, vmo }
    }
}

impl Pager for FilePager {
    fn commit_page(&self, idx: u64, buf: &mut [u8; PAGE_BYTES]) -> vmo::Result<()> {
        self.chain.read(self.vmo, idx, buf).map_err(|e| {
            self.chain.record(e);
            vmo::Error::Io
        })
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
