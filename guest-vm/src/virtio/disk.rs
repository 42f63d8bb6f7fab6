//! Disk backends of the virtio-blk device: an in-memory disk and a file.
//!
//! Invariants: the capacity is fixed at construction and a whole number of 512-byte sectors;
//! `read_at`/`write_at` refuse (with `io::ErrorKind::InvalidInput`) any range that does not lie
//! inside the capacity — including arithmetic overflow — and touch nothing then.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes per sector (the virtio-blk unit of `sector`, whatever the backend's block size).
pub const SECTOR_SIZE: u64 = 512;

/// Storage behind a virtio-blk device.
pub trait DiskBackend: Send {
    /// Size in bytes (a multiple of `SECTOR_SIZE`).
    fn capacity(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Times `flush` was called (for reports).
    fn flushes(&self) -> u64;
}

fn check(capacity: u64, offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{offset:#x}+{len:#x} past the disk's {capacity:#x} bytes"),
        )),
    }
}

fn whole_sectors(bytes: u64) -> io::Result<u64> {
    if bytes == 0 || !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("disk size {bytes:#x} is not a non-zero multiple of {SECTOR_SIZE}"),
        ));
    }
    Ok(bytes)
}

/// A disk held in memory.
#[derive(Debug)]
pub struct MemDisk {
    data: Vec<u8>,
    flushes: u64,
}

impl MemDisk {
    /// A zeroed disk of `bytes` (a non-zero multiple of 512).
    pub fn new(bytes: u64) -> io::Result<Self> {
        let bytes = whole_sectors(bytes)?;
        let len = usize::try_from(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "disk too large"))?;
        Ok(MemDisk {
            data: vec![0; len],
            flushes: 0,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl DiskBackend for MemDisk {
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check(self.capacity(), offset, buf.len())?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        check(self.capacity(), offset, data.len())?;
        let o = offset as usize;
        self.data[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }

    fn flushes(&self) -> u64 {
        self.flushes
    }
}

/// A disk image file; its capacity is the file's size (rounded down to whole sectors), or
/// `bytes` when created.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    capacity: u64,
    flushes: u64,
}

impl FileDisk {
    /// Opens an existing image read-write.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        let capacity = whole_sectors(size - size % SECTOR_SIZE)?;
        Ok(FileDisk {
            file,
            capacity,
            flushes: 0,
        })
    }

    /// Creates (or truncates) an image of `bytes` (a non-zero multiple of 512).
    pub fn create(path: &Path, bytes: u64) -> io::Result<Self> {
        let capacity = whole_sectors(bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(capacity)?;
        Ok(FileDisk {
            file,
            capacity,
            flushes: 0,
        })
    }
}

impl DiskBackend for FileDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check(self.capacity, offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        check(self.capacity, offset, data.len())?;
        self.file.write_all_at(data, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        self.file.sync_data()
    }

    fn flushes(&self) -> u64 {
        self.flushes
    }
}
