//! `Pager`: the source and sink of a Vmo's pages when they do not start out as zeros (snapshot
//! files restored lazily, file-backed ROM images).
//!
//! Contract (called by the Vmo with the Vmo's page lock held, so calls for one Vmo are serial):
//! - `commit_page(idx, buf)` fills `buf` with page `idx`'s contents (read I/O);
//! - `commit_overwrite(idx)` announces that page `idx` is being committed and will be fully
//!   overwritten, so no read is needed;
//! - `update_page(idx)` marks page `idx` dirty (it must be written back before it is dropped);
//! - `decommit_page(idx, data)` hands back the page's final contents as it leaves memory; a
//!   pager writes it back if it was marked dirty.
//!
//! - `read_ahead(idx, count)` (optional; the default ignores it) announces, under the same
//!   lock, that the `commit_page` calls that follow are for pages of `[idx, idx + count)` in
//!   increasing order (some of them may already be committed and never asked for): a pager may
//!   read the range with one I/O and answer those calls from it. It is a hint: it reports no
//!   error (a failed read-ahead just leaves `commit_page` to read, and to report, as usual).
//!
//! Errors are reported as `Error::Io`; the Vmo leaves the page uncommitted in that case.

use crate::{Result, PAGE_BYTES};

pub trait Pager: Send + Sync {
    fn commit_page(&self, idx: u64, buf: &mut [u8; PAGE_BYTES]) -> Result<()>;
    fn commit_overwrite(&self, idx: u64) -> Result<()>;
    fn update_page(&self, idx: u64) -> Result<()>;
    fn decommit_page(&self, idx: u64, data: &[u8; PAGE_BYTES]) -> Result<()>;
    fn read_ahead(&self, _idx: u64, _count: u64) {}
}

#[cfg(feature = "std")]
pub use file::FilePager;

#[cfg(feature = "std")]
mod file {
    //! A pager over a host file: pages are read from the file on commit and written back on
    //! decommit when dirty. Bytes past the file's end read as zeros.
    use super::Pager;
    use crate::{Error, Result, PAGE_BYTES, PAGE_SIZE};
    use std::collections::BTreeSet;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    pub struct FilePager {
        file: File,
        dirty: Mutex<BTreeSet<u64>>,
    }

    impl FilePager {
        pub fn new(file: File) -> Self {
            FilePager {
                file,
                dirty: Mutex::new(BTreeSet::new()),
            }
        }

        /// Pages marked dirty and not yet written back.
        pub fn dirty_pages(&self) -> Vec<u64> {
            self.dirty
                .lock()
                .map(|d| d.iter().copied().collect())
                .unwrap_or_default()
        }

        fn offset(idx: u64) -> Result<u64> {
            idx.checked_mul(PAGE_SIZE).ok_or(Error::OutOfRange)
        }
    }

    impl Pager for FilePager {
        fn commit_page(&self, idx: u64, buf: &mut [u8; PAGE_BYTES]) -> Result<()> {
            let off = Self::offset(idx)?;
            let mut done = 0;
            while done < PAGE_BYTES {
                match self.file.read_at(&mut buf[done..], off + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(Error::Io),
                }
            }
            buf[done..].fill(0);
            Ok(())
        }

        fn commit_overwrite(&self, _idx: u64) -> Result<()> {
            Ok(())
        }

        fn update_page(&self, idx: u64) -> Result<()> {
            self.dirty.lock().map_err(|_| Error::Io)?.insert(idx);
            Ok(())
        }

        fn decommit_page(&self, idx: u64, data: &[u8; PAGE_BYTES]) -> Result<()> {
            let was_dirty = self.dirty.lock().map_err(|_| Error::Io)?.remove(&idx);
            if was_dirty {
                self.file
                    .write_all_at(data, Self::offset(idx)?)
                    .map_err(|_| Error::Io)?;
            }
            Ok(())
        }
    }
}
