//! Reading a configuration file with a bound on its size, shared by the
//! password and ACL files: a file the broker reloads on SIGHUP must not be
//! able to make it allocate without limit.

use std::io;
use std::path::Path;

/// Why a bounded read failed.
pub(crate) enum ReadError {
    /// The file could not be read.
    Io(io::Error),
    /// The file is larger than the bound.
    TooLarge,
}

/// The text of `path`, if it is at most `max` bytes.
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<String, ReadError> {
    let size = std::fs::metadata(path).map_err(ReadError::Io)?.len();
    if size > max {
        return Err(ReadError::TooLarge);
    }
    std::fs::read_to_string(path).map_err(ReadError::Io)
}
