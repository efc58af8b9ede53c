//! The cluster key: the secret every image manifest is authenticated with,
//! and its file format (see the parent module's "Cluster key file").

use super::{io_err, write_file_atomic, ManifestError};
use rand::RngCore;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A key file is 64 hex chars plus a newline; anything much larger is not a
/// key file, and reading it whole would be pointless.
const MAX_KEY_FILE_BYTES: u64 = 256;

/// The 32-byte cluster secret used to authenticate image manifests.
///
/// Deliberately not `PartialEq` (a naive comparison would not be constant
/// time) and its `Debug` output never contains the key material.
#[derive(Clone)]
pub struct ClusterKey(pub(super) [u8; 32]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl ClusterKey {
    /// Generates a fresh random key.
    ///
    /// Uses `rand`'s thread-local CSPRNG (ChaCha, seeded and periodically
    /// reseeded from the OS), which is suitable for key generation. If the OS
    /// RNG is unusable, `rand` panics rather than returning weak bytes; that
    /// is the only reason this signature can be infallible.
    pub fn generate() -> ClusterKey {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        ClusterKey(bytes)
    }

    /// Loads a key file (see the module docs for the format).
    pub fn load(path: &Path) -> Result<ClusterKey, ManifestError> {
        let file = File::open(path).map_err(io_err(path))?;
        // Check the mode of the file we actually opened (fstat), not of the
        // path, so a swap between check and read cannot bypass it. Following
        // a symlink here is fine: the mode that matters is the target's.
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.is_file() {
            return Err(ManifestError::KeyMalformed {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(ManifestError::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = Vec::new();
        file.take(MAX_KEY_FILE_BYTES)
            .read_to_end(&mut text)
            .map_err(io_err(path))?;
        let malformed = |reason: &str| ManifestError::KeyMalformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let hex_part = text.strip_suffix(b"\n").unwrap_or(&text);
        if hex_part.len() != 64 {
            return Err(malformed(
                "expected exactly 64 hex characters (optionally followed by a newline)",
            ));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|_| malformed("contains non-hex characters"))?;
        Ok(ClusterKey(bytes))
    }

    /// Writes the key as 64 lowercase hex chars plus newline, mode `0600`.
    ///
    /// Atomic (temp file + fsync + rename + directory fsync) so a crash never
    /// leaves a truncated key that would make every node reject every image.
    pub fn save(&self, path: &Path) -> Result<(), ManifestError> {
        let mut text = hex::encode(self.0);
        text.push('\n');
        write_file_atomic(path, text.as_bytes(), 0o600).map_err(io_err(path))
    }
}
