//! `Identity`: the 128-bit content hash that names a snapshot file (xxh3-128 of its header with
//! the identity and CRC zeroed, followed by its page index; computed in `format.rs`). A diff
//! records its base's identity; a chain is accepted only if each diff's recorded base is the
//! identity of the file before it. Invariant: plain data, displayed as 32 hex digits.

/// A file's identity (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Identity(pub [u8; 16]);

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
