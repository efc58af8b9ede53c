//! Authenticated manifests for CRIU image directories.
//!
//! Restoring a CRIU image executes whatever code and memory the image
//! contains, so a node must never restore an image directory that it cannot
//! prove was produced by a member of the cluster. Every image directory on
//! the shared storage therefore carries a manifest listing each image file
//! with its size and BLAKE3 digest, authenticated by an HMAC-SHA256 under a
//! cluster-wide secret key ([`ClusterKey`]).
//!
//! Why BLAKE3 for the file digests (format version 2; version 1 used
//! SHA-256): the digests of a 1 GiB dump are computed while the job is
//! stopped, once on the source and once on the target. SHA-256 ran at about
//! 1.3 GB/s here (with SHA-NI) and cost ~0.8 s each way; BLAKE3 is several
//! times faster on the same core and is a cryptographic hash, so collisions
//! stay infeasible. The MAC over the (small) canonical encoding stays
//! HMAC-SHA256.
//!
//! # Cluster key file
//!
//! Exactly 64 lowercase or uppercase hex characters (32 bytes), optionally
//! followed by a single `\n`. The file must not be accessible by group or
//! others (`mode & 0o077 == 0`); [`ClusterKey::load`] refuses it otherwise,
//! because a key readable by every local user lets any of them forge images.
//! [`ClusterKey::save`] writes it with mode `0600`, atomically.
//!
//! # Manifest file
//!
//! Stored as [`MANIFEST_FILE_NAME`] (`MANIFEST.json`) inside the image
//! directory:
//!
//! ```json
//! {
//!   "version": 2,
//!   "job_id": "job-42",
//!   "migration_id": "mig-7",
//!   "created_unix_ms": 1767225600000,
//!   "files": [
//!     {"name": "core-1.img", "size": 1234, "blake3": "<64 lowercase hex>"},
//!     {"name": "pages-1.img", "size": 4096, "blake3": "<64 lowercase hex>"}
//!   ],
//!   "hmac": "<64 lowercase hex>"
//! }
//! ```
//!
//! * `files` is sorted by `name` in strictly increasing byte order (which
//!   also rules out duplicates) and covers every regular file in the
//!   directory except the manifest itself and the caller's `exclude` list
//!   (CRIU log files such as `dump.log`/`restore.log` that legitimately
//!   change after the dump).
//! * `name` is a plain file name: non-empty, not `.` or `..`, no `/`, no NUL,
//!   and not `MANIFEST.json`.
//! * Unknown JSON fields are rejected: they would not be covered by the HMAC.
//! * The manifest is at most 4 MiB; larger files are refused unread.
//!
//! # What the HMAC covers
//!
//! The HMAC is *not* computed over the JSON text (JSON has many encodings of
//! the same value, and re-serialisation would make verification depend on
//! serde_json's formatting). It is HMAC-SHA256, keyed with the cluster key,
//! over this canonical byte string:
//!
//! ```text
//! canonical = "mosix-image-manifest-v2" 0x00
//!             u64be(version)
//!             lp(job_id)
//!             lp(migration_id)
//!             u64be(created_unix_ms)
//!             u64be(number of files)
//!             for each file, in manifest order:
//!                 lp(name) u64be(size) blake3 (32 raw bytes)
//! lp(s)     = u64be(byte length of s) followed by the UTF-8 bytes of s
//! ```
//!
//! Every variable-length field is length-prefixed and every other field has a
//! fixed width, so two different manifests can never produce the same byte
//! string. The leading domain-separation tag keeps a manifest MAC from ever
//! being confused with a MAC the cluster key might produce for some other
//! message type in the future.
//!
//! # Pre-copy chains (format version 3)
//!
//! An iteratively pre-copied dump (see `agent::precopy`) is a chain of image
//! directories: each pre-dump round wrote the pages dirtied since the round
//! before, and the final dump holds only the rest; CRIU finds the older pages
//! through a symlink named `parent` in each directory. A flat manifest cannot
//! describe that, and following arbitrary symlinks or subdirectories is what
//! the flat rules forbid (a link could point a restore anywhere). So a chain
//! has one fixed layout, checked structurally, never by following a link:
//!
//! ```text
//! <image dir>/            final dump, MANIFEST.json
//!     parent -> pre-N     symlink, target exactly "pre-N"
//!     pre-N/              round N (a real directory, not a link)
//!         parent -> ../pre-(N-1)
//!     ...
//!     pre-2/parent -> ../pre-1
//!     pre-1/              round 1: no parent link
//! ```
//!
//! * Rounds are `pre-1` .. `pre-N` (decimal, no leading zeros, every number
//!   present, `N <= MAX_CHAIN_ROUNDS`), directly inside the image directory;
//!   a round directory holds only regular files and (from round 2 on) its
//!   `parent` link. Nothing else may be a directory or a symlink.
//! * Every `parent` link must have exactly the target above (read with
//!   `readlink`, never followed by this code), so each resolves to a sibling
//!   round inside the same image directory.
//! * Files in rounds are listed as `pre-<k>/<name>` (one `/`, the name under
//!   the flat rules, and not `parent`); they are all covered by the HMAC like
//!   top-level files. The `exclude` list matches whole relative names, so it
//!   only ever exempts top-level files (the logs CRIU writes later there):
//!   nothing inside a round escapes the seal.
//! * The manifest gains a `links` list, `[{"name": "parent", "target":
//!   "pre-2"}, {"name": "pre-2/parent", "target": "../pre-1"}]`, sorted by
//!   name, which must be exactly the expected set for the chain's length.
//!   Its canonical MAC input is the version 2 input with the tag
//!   `"mosix-image-manifest-v3" 0x00`, followed by `u64be(number of links)`
//!   and `lp(name) lp(target)` for each link.
//!
//! Version 2 is unchanged and still written for every flat directory: a
//! `links` field in a version 2 manifest, or a directory or symlink in a
//! version 2 image directory, is refused as before. A chain is refused by
//! code that only knows version 2 (unsupported version), never misread.
//!
//! # Limits
//!
//! Verification proves the directory content *at the time it was checked*.
//! Anyone who can write to the directory between [`verify_manifest`] and the
//! CRIU restore can still swap files; callers that do not trust the shared
//! storage should verify a private copy, or restore from a directory only
//! they can write.

mod files;
mod key;
mod scan;

pub(crate) use files::write_file_atomic;
use files::*;
pub use key::ClusterKey;
use scan::*;

use std::collections::BTreeMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

/// File name of the manifest inside an image directory.
pub const MANIFEST_FILE_NAME: &str = "MANIFEST.json";

/// The manifest format version of a flat image directory.
pub const MANIFEST_VERSION: u32 = 2;

/// The format version of a pre-copy chain (see the module docs); written
/// only when the directory holds a chain, so flat directories keep version 2.
pub const MANIFEST_VERSION_CHAIN: u32 = 3;

/// Most pre-dump rounds a chain may have. Far above any sane stop rule; it
/// only bounds what a hostile manifest can make a verifier look at.
pub const MAX_CHAIN_ROUNDS: u32 = 64;

/// The name CRIU gives the link from an image directory to its parent.
pub const PARENT_LINK: &str = "parent";

/// Manifests larger than this are refused without being parsed, so a hostile
/// file on shared storage cannot make a node allocate unbounded memory.
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// Domain-separation tag at the start of the canonical MAC input.
const MAC_DOMAIN_TAG: &[u8] = b"mosix-image-manifest-v2\0";
/// The same for a chain manifest (version 3), whose input also has links.
const MAC_DOMAIN_TAG_CHAIN: &[u8] = b"mosix-image-manifest-v3\0";

type HmacSha256 = Hmac<Sha256>;

/// Errors from key handling and manifest writing/verification.
///
/// Each refusal reason is a distinct variant so callers can log/metric them
/// separately (e.g. tell "tampered" from "wrong key" from "corrupt copy").
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cluster key file {path} is accessible by group/others (mode {mode:04o}); \
         run `chmod 600` on it"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("cluster key file {path} is malformed: {reason}")]
    KeyMalformed { path: PathBuf, reason: String },
    #[error("no {MANIFEST_FILE_NAME} in image directory {dir}")]
    ManifestMissing { dir: PathBuf },
    #[error("manifest {path} is malformed: {reason}")]
    ManifestMalformed { path: PathBuf, reason: String },
    #[error(
        "manifest in {dir} failed HMAC verification \
         (manifest tampered with, or signed with a different cluster key)"
    )]
    BadHmac { dir: PathBuf },
    #[error("manifest is for job {found:?}, expected job {expected:?}")]
    JobIdMismatch { expected: String, found: String },
    #[error("image file {name:?} is listed in the manifest but missing from the directory")]
    FileMissing { name: String },
    #[error("image file {name:?} is present in the directory but not listed in the manifest")]
    FileAdded { name: String },
    #[error(
        "image file {name:?} has size {actual}, manifest says {expected} \
         (tampered or corrupt)"
    )]
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "image file {name:?} does not match its BLAKE3 digest in the manifest (tampered or corrupt)"
    )]
    HashMismatch { name: String },
    #[error(
        "{name:?} in the image directory is not a regular file \
         (subdirectory, symlink or special file), or was replaced while being read"
    )]
    NotRegularFile { name: String },
    #[error("invalid file name {name:?}: must be a plain file name")]
    InvalidFileName { name: String },
    /// A pre-copy chain that does not have the one allowed layout, or whose
    /// links differ from the manifest's.
    #[error("pre-copy image chain refused: {reason}")]
    BadChain { reason: String },
}

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ManifestError {
    let path = path.into();
    move |source| ManifestError::Io { path, source }
}

/// One image file entry in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    /// Lowercase hex BLAKE3 digest of the file content.
    pub blake3: String,
}

/// One `parent` symlink of a pre-copy chain (version 3 only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLink {
    /// `parent` or `pre-<k>/parent`.
    pub name: String,
    /// Exactly `pre-<N>` (top level) or `../pre-<k-1>`.
    pub target: String,
}

/// The parsed content of `MANIFEST.json` (see module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub job_id: String,
    pub migration_id: String,
    pub created_unix_ms: u64,
    pub files: Vec<ManifestFile>,
    /// The chain's `parent` links (version 3); absent in version 2, whose
    /// JSON is thus byte-for-byte what it always was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<ManifestLink>,
    /// Lowercase hex HMAC-SHA256 over the canonical encoding.
    pub hmac: String,
}

impl Manifest {
    /// The images' size: every listed file's. Why here: an agent reports a
    /// move's image size, and with one file per connection, statting the
    /// directory again for it was ~1.5 ms per 1,000 files, with the job frozen.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Name of pre-dump round `k`'s directory inside an image directory.
pub fn round_dir_name(k: u32) -> String {
    format!("pre-{k}")
}

/// The `parent` links a chain of `rounds` rounds must have, sorted by name.
pub fn chain_links(rounds: u32) -> Vec<ManifestLink> {
    let mut links = Vec::new();
    if rounds == 0 {
        return links;
    }
    links.push(ManifestLink {
        name: PARENT_LINK.to_string(),
        target: round_dir_name(rounds),
    });
    for k in 2..=rounds {
        links.push(ManifestLink {
            name: format!("{}/{PARENT_LINK}", round_dir_name(k)),
            target: format!("../{}", round_dir_name(k - 1)),
        });
    }
    links.sort_by(|a, b| a.name.cmp(&b.name));
    links
}

/// `pre-<k>` in canonical form (no sign, no leading zero, within bounds).
fn parse_round_dir(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("pre-")?;
    if digits.is_empty()
        || digits.starts_with('0')
        || digits.len() > 10
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let k: u32 = digits.parse().ok()?;
    (1..=MAX_CHAIN_ROUNDS).contains(&k).then_some(k)
}

/// Hashes every regular file in `dir`, makes them durable, and writes an
/// authenticated `MANIFEST.json` atomically.
///
/// Files named in `exclude` (e.g. `"dump.log"`) are not listed; they must
/// still be regular files if present. A subdirectory or symlink in `dir` is
/// an error, because CRIU image directories are flat and a symlink could make
/// a later restore read or write outside the directory; the one exception is
/// a pre-copy chain in exactly the layout of the module docs, which gets a
/// version 3 manifest covering every file of every round.
pub fn write_manifest(
    dir: &Path,
    key: &ClusterKey,
    job_id: &str,
    migration_id: &str,
    exclude: &[&str],
) -> Result<Manifest, ManifestError> {
    write_manifest_with(
        dir,
        key,
        job_id,
        migration_id,
        exclude,
        &BTreeMap::new(),
        true,
    )
}

/// A digest computed while the file was being written (see
/// [`super::follow`]). It is used only if the file is still the same inode
/// with the same size; otherwise the file is hashed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Precomputed {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub blake3: [u8; 32],
}

/// Hash (and with `fsync`, flush) the regular files of `dir` ahead of
/// sealing, as [`Precomputed`] digests keyed `prefix + name`; `known` holds
/// digests already taken (by [`super::follow`]), reused when still valid.
/// Symlinks and subdirectories are skipped: the manifest writer judges them.
///
/// Why: a pre-copy round is written while the job still runs, and nothing
/// changes it afterwards, so hashing it then keeps that work out of the
/// frozen window in which the final dump is sealed.
pub fn hash_ahead(
    dir: &Path,
    prefix: &str,
    known: &BTreeMap<String, Precomputed>,
    fsync: bool,
) -> Result<BTreeMap<String, Precomputed>, ManifestError> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let meta = entry.metadata().map_err(io_err(entry.path()))?;
        if !meta.file_type().is_file() {
            continue;
        }
        let reuse = known
            .get(&name)
            .filter(|p| p.dev == meta.dev() && p.ino == meta.ino() && p.size == meta.len());
        let (pre, file) = match reuse {
            Some(p) => (p.clone(), open_same(dir, &name, &meta)?),
            None => {
                let (size, blake3, file) = hash_file(dir, &name, &meta)?;
                let pre = Precomputed {
                    dev: meta.dev(),
                    ino: meta.ino(),
                    size,
                    blake3,
                };
                (pre, file)
            }
        };
        if fsync {
            file.sync_all().map_err(io_err(dir.join(&name)))?;
        }
        out.insert(format!("{prefix}{name}"), pre);
    }
    if fsync {
        sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(out)
}

/// [`write_manifest`], reusing digests already computed for some files.
///
/// With `fsync` false, the files are not flushed here: the caller relies on
/// the file system making closed files durable (NFS commits on close).
pub fn write_manifest_with(
    dir: &Path,
    key: &ClusterKey,
    job_id: &str,
    migration_id: &str,
    exclude: &[&str],
    precomputed: &BTreeMap<String, Precomputed>,
    fsync: bool,
) -> Result<Manifest, ManifestError> {
    let manifest_path = dir.join(MANIFEST_FILE_NAME);
    // A temp file left by a crashed earlier attempt would otherwise be hashed
    // as an image file (and later flagged by verify as an unexpected file).
    let stale_tmp = temp_path_for(&manifest_path).map_err(io_err(&manifest_path))?;
    match fs::remove_file(&stale_tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&stale_tmp)(e)),
    }

    let scan = scan_tree(dir, true)?;
    let rounds = check_chain_shape(&scan)?;
    let entries = scan.files;
    let mut files = Vec::new();
    let mut to_sync = Vec::new();
    // BTreeMap iteration is in byte order of the names, which is exactly the
    // order the format requires.
    let listed: Vec<(&String, &Metadata)> = entries
        .iter()
        .filter(|(name, _)| !exclude.contains(&name.as_str()))
        .collect();
    // Digests the follower computed during the dump, where they still
    // describe the file; the rest are hashed now, several files at a time.
    let mut known: Vec<Option<Digest>> = Vec::with_capacity(listed.len());
    for (name, meta) in &listed {
        let reuse = precomputed
            .get(*name)
            .filter(|p| p.dev == meta.dev() && p.ino == meta.ino() && p.size == meta.len());
        known.push(match reuse {
            Some(p) => {
                open_same(dir, name, meta)?;
                Some((p.size, p.blake3))
            }
            None => None,
        });
    }
    let todo: Vec<(&str, &Metadata)> = listed
        .iter()
        .zip(&known)
        .filter(|(_, k)| k.is_none())
        .map(|((name, meta), _)| (name.as_str(), *meta))
        .collect();
    let mut hashed = hash_files_parallel(dir, &todo).into_iter();
    for ((name, _), known) in listed.iter().zip(known) {
        let (size, digest) = match known {
            Some(k) => k,
            None => hashed.next().ok_or_else(|| ManifestError::Io {
                path: dir.join(name.as_str()),
                source: io::Error::other("a file was left unhashed"),
            })??,
        };
        // The source copy of the process may be gone soon after the manifest
        // exists; the images must survive a crash of this node from then on.
        // By name, not an open file: a dump may hold more files than the
        // agent may keep open at once.
        if fsync {
            to_sync.push(name.as_str());
        }
        files.push(ManifestFile {
            name: (*name).clone(),
            size,
            blake3: hex::encode(digest),
        });
    }
    // Make the image files and their directory entries durable.
    if fsync {
        sync_all_parallel(dir, to_sync)?;
        for k in 1..=rounds {
            let sub = dir.join(round_dir_name(k));
            sync_dir(&sub).map_err(io_err(&sub))?;
        }
        sync_dir(dir).map_err(io_err(dir))?;
    }

    let created_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        // A clock before 1970 is broken, but not a reason to fail a dump;
        // the timestamp is informational only.
        .unwrap_or(0);

    let mut manifest = Manifest {
        version: if rounds == 0 {
            MANIFEST_VERSION
        } else {
            MANIFEST_VERSION_CHAIN
        },
        job_id: job_id.to_string(),
        migration_id: migration_id.to_string(),
        created_unix_ms,
        files,
        links: chain_links(rounds),
        hmac: String::new(),
    };
    let mac = compute_mac(key, &manifest, &manifest_path)?;
    manifest.hmac = hex::encode(mac.finalize().into_bytes());

    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ManifestError::ManifestMalformed {
            path: manifest_path.clone(),
            reason: format!("serialisation failed: {e}"),
        })?;
    // Same durability policy as the image files: under `close` the file
    // system commits what is closed (NFS), so the extra flushes only cost
    // frozen time; the rename is atomic either way.
    write_file_atomic_with(&manifest_path, &json, 0o644, fsync).map_err(io_err(&manifest_path))?;
    Ok(manifest)
}

/// Verifies that `dir` holds exactly the files described by an authentic
/// manifest for `expected_job_id`, with unchanged sizes and contents.
///
/// Files named in `exclude` may be present (as regular files) with any
/// content, or absent, unless the manifest itself lists them.
pub fn verify_manifest(
    dir: &Path,
    key: &ClusterKey,
    expected_job_id: &str,
    exclude: &[&str],
) -> Result<Manifest, ManifestError> {
    let (manifest, rest) =
        verify_manifest_deferring(dir, key, expected_job_id, exclude, |_| false)?;
    rest.check()?;
    Ok(manifest)
}

/// Content checks left for later by [`verify_manifest_deferring`].
#[derive(Debug)]
pub struct DeferredCheck {
    dir: PathBuf,
    files: Vec<(ManifestFile, Metadata)>,
}

impl DeferredCheck {
    /// Bytes still to hash.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(f, _)| f.size).sum()
    }

    /// Hash the deferred files and compare them with the manifest.
    pub fn check(self) -> Result<(), ManifestError> {
        for (f, meta) in &self.files {
            check_file(&self.dir, f, meta)?;
        }
        Ok(())
    }
}

/// Everything [`verify_manifest`] does, except hashing the files for which
/// `defer(name)` is true: those are returned as a [`DeferredCheck`]. The
/// manifest's authenticity, the file set, every size and every other file's
/// content are checked before this returns.
///
/// Why: a restore can read memory pages while they are being verified, as
/// long as the restored process does not run before the check passed (the
/// agent gates CRIU's pre-resume step on it). Only files that CRIU merely
/// copies into the process (memory pages) may be deferred; files CRIU parses
/// must be checked first.
pub fn verify_manifest_deferring(
    dir: &Path,
    key: &ClusterKey,
    expected_job_id: &str,
    exclude: &[&str],
    defer: impl Fn(&str) -> bool,
) -> Result<(Manifest, DeferredCheck), ManifestError> {
    let manifest_path = dir.join(MANIFEST_FILE_NAME);
    let manifest = read_manifest(dir, &manifest_path)?;
    validate_structure(&manifest, &manifest_path)?;

    // Authenticate before trusting any field (including job_id) for anything
    // beyond the structural checks above.
    let mac = compute_mac(key, &manifest, &manifest_path)?;
    let tag = hex::decode(&manifest.hmac).map_err(|_| ManifestError::BadHmac {
        dir: dir.to_path_buf(),
    })?;
    // `verify_slice` compares in constant time, so timing does not reveal
    // how many leading bytes of a forged tag were right.
    mac.verify_slice(&tag).map_err(|_| ManifestError::BadHmac {
        dir: dir.to_path_buf(),
    })?;

    if manifest.job_id != expected_job_id {
        return Err(ManifestError::JobIdMismatch {
            expected: expected_job_id.to_string(),
            found: manifest.job_id,
        });
    }

    // Cheap set comparisons first, so a missing or extra file is reported
    // without hashing gigabytes first.
    let scan = scan_tree(dir, manifest.version == MANIFEST_VERSION_CHAIN)?;
    let rounds = check_chain_shape(&scan)?;
    if chain_links(rounds) != manifest.links {
        // The links were checked against the expected chain of the
        // manifest's own length in validate_structure, so any difference
        // is a round too many or too few on disk.
        return Err(ManifestError::BadChain {
            reason: format!(
                "the directory holds {rounds} pre-dump round(s), the manifest {}",
                manifest.links.len()
            ),
        });
    }
    let entries = scan.files;
    for f in &manifest.files {
        if !entries.contains_key(&f.name) {
            return Err(ManifestError::FileMissing {
                name: f.name.clone(),
            });
        }
    }
    for name in entries.keys() {
        let listed = manifest
            .files
            .binary_search_by(|f| f.name.as_str().cmp(name))
            .is_ok();
        if !listed && !exclude.contains(&name.as_str()) {
            return Err(ManifestError::FileAdded { name: name.clone() });
        }
    }
    let mut deferred = DeferredCheck {
        dir: dir.to_path_buf(),
        files: Vec::new(),
    };
    let mut now: Vec<(&ManifestFile, &Metadata)> = Vec::new();
    for f in &manifest.files {
        let Some(meta) = entries.get(&f.name) else {
            return Err(ManifestError::FileMissing {
                name: f.name.clone(),
            });
        };
        if meta.len() != f.size {
            return Err(ManifestError::SizeMismatch {
                name: f.name.clone(),
                expected: f.size,
                actual: meta.len(),
            });
        }
        if defer(&f.name) {
            deferred.files.push((f.clone(), meta.clone()));
        } else {
            now.push((f, meta));
        }
    }
    let todo: Vec<(&str, &Metadata)> = now.iter().map(|(f, m)| (f.name.as_str(), *m)).collect();
    // In the manifest's order, so the first bad file is the one reported.
    for ((f, _), got) in now.iter().zip(hash_files_parallel(dir, &todo)) {
        compare_file(f, got?)?;
    }
    Ok((manifest, deferred))
}

/// Hash one listed file and compare size and digest with the manifest.
fn check_file(dir: &Path, f: &ManifestFile, meta: &Metadata) -> Result<(), ManifestError> {
    let (size, digest, _file) = hash_file(dir, &f.name, meta)?;
    compare_file(f, (size, digest))
}

/// Compare a file's size and digest, as read, with its manifest entry.
fn compare_file(f: &ManifestFile, (size, digest): Digest) -> Result<(), ManifestError> {
    // The file may have changed size between stat and read.
    if size != f.size {
        return Err(ManifestError::SizeMismatch {
            name: f.name.clone(),
            expected: f.size,
            actual: size,
        });
    }
    // Comparing public digests: constant time is unnecessary here (the
    // attacker already knows both values), so plain hex comparison is ok.
    if hex::encode(digest) != f.blake3 {
        return Err(ManifestError::HashMismatch {
            name: f.name.clone(),
        });
    }
    Ok(())
}

/// Reads and parses `MANIFEST.json` with a size cap, refusing non-regular
/// files (a symlinked manifest could point at attacker-chosen content
/// elsewhere, or at a device that never ends).
fn read_manifest(dir: &Path, path: &Path) -> Result<Manifest, ManifestError> {
    let lmeta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ManifestError::ManifestMissing {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    if !lmeta.file_type().is_file() {
        return Err(ManifestError::NotRegularFile {
            name: MANIFEST_FILE_NAME.to_string(),
        });
    }
    let file = File::open(path).map_err(io_err(path))?;
    let fmeta = file.metadata().map_err(io_err(path))?;
    if !same_inode(&lmeta, &fmeta) {
        return Err(ManifestError::NotRegularFile {
            name: MANIFEST_FILE_NAME.to_string(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::ManifestMalformed {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_MANIFEST_BYTES} bytes"),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| ManifestError::ManifestMalformed {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

/// Structural checks that do not need the key. Done before the HMAC check so
/// that even a manifest correctly signed by a buggy or compromised writer
/// cannot name files outside the directory.
fn validate_structure(m: &Manifest, path: &Path) -> Result<(), ManifestError> {
    let malformed = |reason: String| ManifestError::ManifestMalformed {
        path: path.to_path_buf(),
        reason,
    };
    if m.version != MANIFEST_VERSION && m.version != MANIFEST_VERSION_CHAIN {
        return Err(malformed(format!(
            "unsupported version {} (expected {MANIFEST_VERSION}, or {MANIFEST_VERSION_CHAIN} for a pre-copy chain)",
            m.version
        )));
    }
    // The chain's length follows from its top link; every link must then be
    // exactly the expected one, so no link can point anywhere else.
    let rounds = if m.version == MANIFEST_VERSION {
        if !m.links.is_empty() {
            return Err(malformed(format!(
                "version {MANIFEST_VERSION} manifests have no links"
            )));
        }
        0
    } else {
        let top = m
            .links
            .iter()
            .find(|l| l.name == PARENT_LINK)
            .and_then(|l| parse_round_dir(&l.target))
            .ok_or_else(|| ManifestError::BadChain {
                reason: format!(
                    "no top-level {PARENT_LINK:?} link to a round pre-1..pre-{MAX_CHAIN_ROUNDS}"
                ),
            })?;
        if m.links != chain_links(top) {
            return Err(ManifestError::BadChain {
                reason: format!(
                    "links are not exactly the {top}-round chain {:?}",
                    chain_links(top)
                ),
            });
        }
        top
    };
    if !is_lower_hex(&m.hmac, 64) {
        return Err(malformed("hmac is not 64 lowercase hex characters".into()));
    }
    let mut prev: Option<&str> = None;
    for f in &m.files {
        validate_listed_name(&f.name, rounds)?;
        if !is_lower_hex(&f.blake3, 64) {
            return Err(malformed(format!(
                "blake3 of {:?} is not 64 lowercase hex characters",
                f.name
            )));
        }
        if let Some(p) = prev {
            if p >= f.name.as_str() {
                return Err(malformed(format!(
                    "files not strictly sorted by name (or duplicated) at {:?}",
                    f.name
                )));
            }
        }
        prev = Some(&f.name);
    }
    Ok(())
}

fn validate_file_name(name: &str) -> Result<(), ManifestError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name == MANIFEST_FILE_NAME;
    if bad {
        return Err(ManifestError::InvalidFileName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// A listed file name: plain at the top level, or `pre-<k>/<plain>` inside
/// round `k <= rounds`. In a chain, no file may take the place of a link or
/// of a round directory.
fn validate_listed_name(name: &str, rounds: u32) -> Result<(), ManifestError> {
    let invalid = || ManifestError::InvalidFileName {
        name: name.to_string(),
    };
    let plain = match name.split_once('/') {
        None => name,
        Some((round, rest)) if rounds > 0 => {
            match parse_round_dir(round) {
                Some(k) if k <= rounds => {}
                _ => return Err(invalid()),
            }
            rest
        }
        Some(_) => return Err(invalid()),
    };
    validate_file_name(plain).map_err(|_| invalid())?;
    if rounds > 0 && (plain == PARENT_LINK || parse_round_dir(plain).is_some()) {
        return Err(invalid());
    }
    Ok(())
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Feeds the canonical encoding (see module docs) of `m` into a fresh MAC.
/// The `hmac` field itself is ignored.
fn compute_mac(key: &ClusterKey, m: &Manifest, path: &Path) -> Result<HmacSha256, ManifestError> {
    // new_from_slice only fails for key lengths HMAC cannot take; SHA-256
    // HMAC accepts any length, so this is unreachable, but no panics here.
    let mut mac = HmacSha256::new_from_slice(&key.0).map_err(|_| ManifestError::KeyMalformed {
        path: path.to_path_buf(),
        reason: "key rejected by HMAC".into(),
    })?;
    let lp = |mac: &mut HmacSha256, s: &str| {
        mac.update(&(s.len() as u64).to_be_bytes());
        mac.update(s.as_bytes());
    };
    let chain = m.version == MANIFEST_VERSION_CHAIN;
    mac.update(if chain {
        MAC_DOMAIN_TAG_CHAIN
    } else {
        MAC_DOMAIN_TAG
    });
    mac.update(&u64::from(m.version).to_be_bytes());
    lp(&mut mac, &m.job_id);
    lp(&mut mac, &m.migration_id);
    mac.update(&m.created_unix_ms.to_be_bytes());
    mac.update(&(m.files.len() as u64).to_be_bytes());
    for f in &m.files {
        lp(&mut mac, &f.name);
        mac.update(&f.size.to_be_bytes());
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&f.blake3, &mut digest).map_err(|_| {
            ManifestError::ManifestMalformed {
                path: path.to_path_buf(),
                reason: format!("blake3 of {:?} is not valid hex", f.name),
            }
        })?;
        mac.update(&digest);
    }
    if chain {
        mac.update(&(m.links.len() as u64).to_be_bytes());
        for l in &m.links {
            lp(&mut mac, &l.name);
            lp(&mut mac, &l.target);
        }
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::PermissionsExt;
    use tempfile::TempDir;

    const EXCLUDE: &[&str] = &["dump.log", "restore.log"];

    fn key() -> ClusterKey {
        ClusterKey([7u8; 32])
    }

    fn image_dir() -> TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("core-1.img"), b"core data").unwrap();
        fs::write(
            d.path().join("pages-1.img"),
            vec![0xabu8; 3 * 1024 * 1024 + 17],
        )
        .unwrap();
        fs::write(d.path().join("mm-1.img"), b"mm").unwrap();
        fs::write(d.path().join("empty.img"), b"").unwrap();
        fs::write(d.path().join("dump.log"), b"log line\n").unwrap();
        d
    }

    fn signed_dir() -> (TempDir, Manifest) {
        let d = image_dir();
        let m = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap();
        (d, m)
    }

    #[test]
    fn manifest_written_without_fsync_verifies_and_replaces_the_old_one() {
        // `--image-sync close`: no fsyncs, but the manifest is still complete
        // and authentic, and a rewrite replaces the old one whole.
        let d = image_dir();
        let none = BTreeMap::new();
        write_manifest_with(d.path(), &key(), "job-1", "mig-1", EXCLUDE, &none, false).unwrap();
        fs::write(d.path().join("core-1.img"), b"core data, changed").unwrap();
        assert!(verify(&d).is_err(), "a changed file must be refused");
        write_manifest_with(d.path(), &key(), "job-1", "mig-2", EXCLUDE, &none, false).unwrap();
        let m = verify(&d).unwrap();
        assert_eq!(m.migration_id, "mig-2");
        assert!(!temp_path_for(&d.path().join(MANIFEST_FILE_NAME))
            .unwrap()
            .exists());
    }

    #[test]
    fn many_files_are_fsynced_in_parallel_and_a_failure_names_its_file() {
        // More files than fsync threads (a job with many connections): all
        // sealed, and the manifest verifies.
        let d = image_dir();
        for i in 0..(SYNC_THREADS * 3 + 1) {
            fs::write(d.path().join(format!("tcp-stream-{i}.img")), [i as u8; 300]).unwrap();
        }
        let m = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap();
        assert!(m.files.len() > SYNC_THREADS * 3);
        verify(&d).unwrap();
        // A file that cannot be synced (gone) fails the seal with its name,
        // whichever thread had it.
        let names = ["core-1.img", "missing-1.img", "tcp-stream-0.img"];
        let err = sync_all_parallel(d.path(), names.to_vec()).unwrap_err();
        assert!(err.to_string().contains("missing-1.img"), "{err}");
        sync_all_parallel(d.path(), vec!["core-1.img"]).unwrap();
        sync_all_parallel(d.path(), vec![]).unwrap();
    }

    #[test]
    fn many_files_are_hashed_in_parallel_and_the_first_bad_one_is_named() {
        // Enough small files for several hashing threads: every digest is
        // the file's own, in the manifest's order.
        let d = image_dir();
        let n = HASH_FILES_PER_THREAD * HASH_THREADS * 2 + 3;
        for i in 0..n {
            fs::write(
                d.path().join(format!("tcp-stream-{i:04}.img")),
                format!("socket {i}").repeat(i % 7 + 1),
            )
            .unwrap();
        }
        let m = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap();
        assert_eq!(m.files.len(), n + 4);
        for f in &m.files {
            let want = blake3::hash(&fs::read(d.path().join(&f.name)).unwrap());
            assert_eq!(f.blake3, want.to_hex().to_string(), "{}", f.name);
        }
        verify(&d).unwrap();
        // Two files changed: the error names the first in the manifest's
        // order, whichever thread hashed which.
        for i in [n - 2, 40] {
            let p = d.path().join(format!("tcp-stream-{i:04}.img"));
            let len = fs::metadata(&p).unwrap().len() as usize;
            fs::write(&p, vec![b'x'; len]).unwrap();
        }
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::HashMismatch { name } if name == "tcp-stream-0040.img"),
            "{err:?}"
        );
    }

    fn verify(d: &TempDir) -> Result<Manifest, ManifestError> {
        verify_manifest(d.path(), &key(), "job-1", EXCLUDE)
    }

    fn read_json(d: &TempDir) -> serde_json::Value {
        serde_json::from_slice(&fs::read(d.path().join(MANIFEST_FILE_NAME)).unwrap()).unwrap()
    }

    fn write_json(d: &TempDir, v: &serde_json::Value) {
        fs::write(
            d.path().join(MANIFEST_FILE_NAME),
            serde_json::to_vec(v).unwrap(),
        )
        .unwrap();
    }

    /// Re-signs a manifest with the test key, to build manifests that pass
    /// the HMAC but are otherwise hostile.
    fn resign(m: &mut Manifest) {
        let mac = compute_mac(&key(), m, Path::new("x")).unwrap();
        m.hmac = hex::encode(mac.finalize().into_bytes());
    }

    #[test]
    fn round_trip_ok() {
        let (d, written) = signed_dir();
        let names: Vec<_> = written.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["core-1.img", "empty.img", "mm-1.img", "pages-1.img"]
        );
        let pages = &written.files[3];
        assert_eq!(pages.size, 3 * 1024 * 1024 + 17);
        let expected = blake3::hash(&vec![0xabu8; 3 * 1024 * 1024 + 17])
            .to_hex()
            .to_string();
        assert_eq!(pages.blake3, expected);
        let verified = verify(&d).unwrap();
        assert_eq!(verified, written);
        // The images' size is every listed file's, the excluded log not
        // counted: what the agents report as a move's image size.
        assert_eq!(written.bytes(), 9 + 2 + 3 * 1024 * 1024 + 17);
        // No temp file left behind.
        assert!(!d.path().join(".MANIFEST.json.tmp").exists());
    }

    #[test]
    fn modified_byte_refused_naming_file() {
        let (d, _) = signed_dir();
        let p = d.path().join("pages-1.img");
        let mut data = fs::read(&p).unwrap();
        data[2 * 1024 * 1024 + 5] ^= 1;
        fs::write(&p, data).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::HashMismatch { name } if name == "pages-1.img"),
            "{err:?}"
        );
        assert!(err.to_string().contains("pages-1.img"));
    }

    #[test]
    fn truncated_file_refused() {
        let (d, _) = signed_dir();
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join("core-1.img"))
            .unwrap();
        f.set_len(3).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::SizeMismatch { name, expected: 9, actual: 3 } if name == "core-1.img"),
            "{err:?}"
        );
        assert!(err.to_string().contains("core-1.img"));
    }

    #[test]
    fn grown_file_refused_and_a_file_larger_than_scanned_is_hashed_to_its_end() {
        use std::io::Write;
        // Appended to after sealing: refused by its size.
        let (d, _) = signed_dir();
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join("core-1.img"))
            .unwrap();
        f.write_all(b"+").unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::SizeMismatch { name, expected: 9, actual: 10 } if name == "core-1.img"),
            "{err:?}"
        );
        // A file larger than the scan said (it grew between the scan and
        // the read) is read to its end, not cut at the scanned size.
        let d = tempfile::tempdir().unwrap();
        // (4 KiB: the buffer is then one byte larger, so a hash that
        // stopped at the scanned size would stop after the first read.)
        fs::write(d.path().join("a.img"), vec![1u8; 4096]).unwrap();
        let scanned = fs::symlink_metadata(d.path().join("a.img")).unwrap();
        fs::write(d.path().join("a.img"), vec![7u8; 100_000]).unwrap();
        let (size, digest, _) = files::hash_file(d.path(), "a.img", &scanned).unwrap();
        assert_eq!(size, 100_000);
        assert_eq!(digest, <[u8; 32]>::from(blake3::hash(&vec![7u8; 100_000])));
    }

    #[test]
    fn added_file_refused() {
        let (d, _) = signed_dir();
        fs::write(d.path().join("evil.img"), b"x").unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::FileAdded { name } if name == "evil.img"),
            "{err:?}"
        );
        assert!(err.to_string().contains("evil.img"));
    }

    #[test]
    fn removed_file_refused() {
        let (d, _) = signed_dir();
        fs::remove_file(d.path().join("mm-1.img")).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::FileMissing { name } if name == "mm-1.img"),
            "{err:?}"
        );
        assert!(err.to_string().contains("mm-1.img"));
    }

    #[test]
    fn manifest_missing_refused() {
        let d = image_dir();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(err, ManifestError::ManifestMissing { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn edited_manifest_with_old_hmac_refused() {
        let (d, _) = signed_dir();
        // Attacker truncates a file and updates size+hash in the manifest,
        // but cannot recompute the HMAC.
        fs::write(d.path().join("core-1.img"), b"evil").unwrap();
        let mut v = read_json(&d);
        v["files"][0]["size"] = 4.into();
        v["files"][0]["blake3"] = blake3::hash(b"evil").to_hex().to_string().into();
        write_json(&d, &v);
        let err = verify(&d).unwrap_err();
        assert!(matches!(err, ManifestError::BadHmac { .. }), "{err:?}");

        // Even editing only the informational timestamp breaks the MAC.
        let (d, _) = signed_dir();
        let mut v = read_json(&d);
        v["created_unix_ms"] = 1.into();
        write_json(&d, &v);
        let err = verify(&d).unwrap_err();
        assert!(matches!(err, ManifestError::BadHmac { .. }), "{err:?}");
    }

    #[test]
    fn wrong_key_refused() {
        let (d, _) = signed_dir();
        let err = verify_manifest(d.path(), &ClusterKey([8u8; 32]), "job-1", EXCLUDE).unwrap_err();
        assert!(matches!(err, ManifestError::BadHmac { .. }), "{err:?}");
    }

    #[test]
    fn job_id_mismatch_refused() {
        let (d, _) = signed_dir();
        let err = verify_manifest(d.path(), &key(), "job-2", EXCLUDE).unwrap_err();
        assert!(
            matches!(&err, ManifestError::JobIdMismatch { expected, found } if expected == "job-2" && found == "job-1"),
            "{err:?}"
        );
    }

    #[test]
    fn malformed_json_refused() {
        let (d, _) = signed_dir();
        fs::write(d.path().join(MANIFEST_FILE_NAME), b"{\"version\":1,").unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(err, ManifestError::ManifestMalformed { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_field_refused() {
        let (d, _) = signed_dir();
        let mut v = read_json(&d);
        v["restore_args"] = "--evil".into();
        write_json(&d, &v);
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(err, ManifestError::ManifestMalformed { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn huge_manifest_refused() {
        let (d, _) = signed_dir();
        let mut big = b"{\"version\":1,\"job_id\":\"".to_vec();
        big.resize(MAX_MANIFEST_BYTES as usize + 10, b'a');
        fs::write(d.path().join(MANIFEST_FILE_NAME), big).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::ManifestMalformed { reason, .. } if reason.contains("larger")),
            "{err:?}"
        );
    }

    #[test]
    fn wrong_version_refused() {
        let (d, mut m) = signed_dir();
        // Validly signed, so only the version check can reject it. Version 1
        // (SHA-256 digests) is refused too: its digests mean something else.
        m.version = 1;
        resign(&mut m);
        fs::write(
            d.path().join(MANIFEST_FILE_NAME),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::ManifestMalformed { reason, .. } if reason.contains("version")),
            "{err:?}"
        );
    }

    #[test]
    fn path_traversal_name_refused_even_if_signed() {
        for bad in [
            "../etc/passwd",
            "..",
            ".",
            "",
            "a/b",
            "/abs",
            MANIFEST_FILE_NAME,
        ] {
            let (d, mut m) = signed_dir();
            m.files[0].name = bad.to_string();
            m.files.sort_by(|a, b| a.name.cmp(&b.name));
            resign(&mut m);
            fs::write(
                d.path().join(MANIFEST_FILE_NAME),
                serde_json::to_vec(&m).unwrap(),
            )
            .unwrap();
            let err = verify(&d).unwrap_err();
            assert!(
                matches!(&err, ManifestError::InvalidFileName { name } if name == bad),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn duplicate_or_unsorted_entries_refused() {
        let (d, mut m) = signed_dir();
        let dup = m.files[0].clone();
        m.files.insert(1, dup);
        resign(&mut m);
        fs::write(
            d.path().join(MANIFEST_FILE_NAME),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(err, ManifestError::ManifestMalformed { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn excluded_log_may_change_or_vanish() {
        let (d, _) = signed_dir();
        fs::write(d.path().join("dump.log"), b"much more log output\n").unwrap();
        fs::write(d.path().join("restore.log"), b"restore started\n").unwrap();
        verify(&d).unwrap();
        fs::remove_file(d.path().join("dump.log")).unwrap();
        verify(&d).unwrap();
        // Without the exclusion the same file is an unexpected addition.
        let err = verify_manifest(d.path(), &key(), "job-1", &[]).unwrap_err();
        assert!(
            matches!(&err, ManifestError::FileAdded { name } if name == "restore.log"),
            "{err:?}"
        );
    }

    #[test]
    fn symlink_and_subdir_refused() {
        let (d, _) = signed_dir();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("restore.log")).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::NotRegularFile { name } if name == "restore.log"),
            "{err:?}"
        );

        let d = image_dir();
        fs::create_dir(d.path().join("sub")).unwrap();
        let err = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap_err();
        assert!(
            matches!(&err, ManifestError::NotRegularFile { name } if name == "sub"),
            "{err:?}"
        );

        // A symlinked manifest is refused too.
        let (d, _) = signed_dir();
        let real = d.path().join("real.json");
        fs::rename(d.path().join(MANIFEST_FILE_NAME), &real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join(MANIFEST_FILE_NAME)).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(err, ManifestError::NotRegularFile { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn rewrite_replaces_manifest_and_stale_temp() {
        let (d, _) = signed_dir();
        fs::write(d.path().join(".MANIFEST.json.tmp"), b"junk from a crash").unwrap();
        fs::write(d.path().join("new.img"), b"new").unwrap();
        let m = write_manifest(d.path(), &key(), "job-1", "mig-2", EXCLUDE).unwrap();
        assert!(m.files.iter().any(|f| f.name == "new.img"));
        assert!(!m.files.iter().any(|f| f.name.starts_with(".MANIFEST")));
        assert_eq!(verify(&d).unwrap().migration_id, "mig-2");
    }

    #[test]
    fn canonical_encoding_is_unambiguous() {
        // Moving bytes between adjacent string fields must change the MAC.
        let base = Manifest {
            version: 1,
            job_id: "ab".into(),
            migration_id: "c".into(),
            created_unix_ms: 5,
            files: vec![],
            links: vec![],
            hmac: String::new(),
        };
        let shifted = Manifest {
            job_id: "a".into(),
            migration_id: "bc".into(),
            ..base.clone()
        };
        let p = Path::new("x");
        let a = compute_mac(&key(), &base, p)
            .unwrap()
            .finalize()
            .into_bytes();
        let b = compute_mac(&key(), &shifted, p)
            .unwrap()
            .finalize()
            .into_bytes();
        assert_ne!(a, b);
    }

    #[test]
    fn key_round_trip_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cluster.key");
        let k = ClusterKey::generate();
        k.save(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&p).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        let loaded = ClusterKey::load(&p).unwrap();
        assert_eq!(loaded.0, k.0);
        // Overwriting works and leaves no temp file.
        ClusterKey::generate().save(&p).unwrap();
        assert_ne!(ClusterKey::load(&p).unwrap().0, k.0);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        // Two generated keys differ (sanity check the RNG is wired up).
        assert_ne!(ClusterKey::generate().0, ClusterKey::generate().0);
    }

    #[test]
    fn key_file_without_newline_accepted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        fs::write(&p, "AB".repeat(32)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(ClusterKey::load(&p).unwrap().0, [0xab; 32]);
    }

    #[test]
    fn key_file_readable_by_others_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        ClusterKey::generate().save(&p).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let err = ClusterKey::load(&p).unwrap_err();
            assert!(
                matches!(err, ManifestError::KeyPermissions { mode: m, .. } if m == mode),
                "{mode:o}: {err:?}"
            );
            assert!(err.to_string().contains("chmod 600"));
        }
    }

    #[test]
    fn malformed_key_file_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        let cases: [&[u8]; 5] = [
            b"",
            b"abcd\n",
            &[b'a'; 66],
            b"zz00000000000000000000000000000000000000000000000000000000000000\n",
            b"0000000000000000000000000000000000000000000000000000000000000000\n\n",
        ];
        for c in cases {
            fs::write(&p, c).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            let err = ClusterKey::load(&p).unwrap_err();
            assert!(
                matches!(err, ManifestError::KeyMalformed { .. }),
                "{c:?}: {err:?}"
            );
        }
    }

    #[test]
    fn debug_does_not_leak_key() {
        let k = ClusterKey([0x5a; 32]);
        let s = format!("{k:?} {k:#?}");
        assert!(!s.contains("5a5a"), "{s}");
        assert!(!s.contains("90, 90"), "{s}");
        assert!(s.contains("redacted"));
    }

    /// Random byte mutations of a valid manifest must never panic, and any
    /// mutation that is still accepted must mean exactly the same manifest
    /// (e.g. whitespace changes).
    #[test]
    fn random_manifest_mutations_never_panic() {
        // Small files: accepted mutations get their files re-hashed, and
        // hashing megabytes hundreds of times is slow in debug builds.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("core-1.img"), b"core").unwrap();
        fs::write(d.path().join("pages-1.img"), b"pages").unwrap();
        let original = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap();
        let path = d.path().join(MANIFEST_FILE_NAME);
        let pristine = fs::read(&path).unwrap();
        // xorshift64*: deterministic, dependency-free.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut accepted = 0;
        for _ in 0..600 {
            let mut bytes = pristine.clone();
            let edits = 1 + next() % 4;
            for _ in 0..edits {
                let pos = (next() % bytes.len() as u64) as usize;
                match next() % 4 {
                    0 => bytes[pos] = next() as u8,
                    1 => bytes[pos] ^= 1 << (next() % 8),
                    2 => {
                        bytes.remove(pos);
                    }
                    _ => bytes.insert(pos, b"0a\"{}[],:-\\ "[(next() % 12) as usize]),
                }
                if bytes.is_empty() {
                    bytes.push(b'{');
                }
            }
            fs::write(&path, &bytes).unwrap();
            if let Ok(m) = verify(&d) {
                assert_eq!(m, original, "accepted a semantically different manifest");
                accepted += 1;
            }
        }
        // Sanity: the pristine manifest still verifies, and most mutations
        // were rejected (so the loop really exercised the error paths).
        fs::write(&path, &pristine).unwrap();
        verify(&d).unwrap();
        assert!(accepted < 300, "accepted {accepted} of 600 mutations");
    }

    // ---- pre-copy chains (version 3) ----

    /// An image directory with a `rounds`-round pre-copy chain, laid out as
    /// CRIU leaves it after `pre-dump --prev-images-dir` rounds and a final
    /// dump on top.
    fn chain_dir(rounds: u32) -> TempDir {
        let d = image_dir();
        for k in 1..=rounds {
            let r = d.path().join(round_dir_name(k));
            fs::create_dir(&r).unwrap();
            fs::write(r.join("pages-1.img"), vec![k as u8; 10_000]).unwrap();
            fs::write(r.join("pagemap-1.img"), b"pagemap").unwrap();
            fs::write(r.join("pre-dump.log"), b"pre-dump log\n").unwrap();
            if k > 1 {
                std::os::unix::fs::symlink(format!("../pre-{}", k - 1), r.join("parent")).unwrap();
            }
        }
        std::os::unix::fs::symlink(format!("pre-{rounds}"), d.path().join("parent")).unwrap();
        d
    }

    fn signed_chain(rounds: u32) -> (TempDir, Manifest) {
        let d = chain_dir(rounds);
        let m = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap();
        (d, m)
    }

    fn relink(path: &Path, target: &str) {
        fs::remove_file(path).unwrap();
        std::os::unix::fs::symlink(target, path).unwrap();
    }

    #[test]
    fn chain_round_trip_covers_every_round() {
        let (d, m) = signed_chain(3);
        assert_eq!(m.version, MANIFEST_VERSION_CHAIN);
        assert_eq!(m.links, chain_links(3));
        let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        for k in 1..=3 {
            for f in ["pages-1.img", "pagemap-1.img", "pre-dump.log"] {
                let n = format!("pre-{k}/{f}");
                assert!(names.contains(&n.as_str()), "{n} sealed: {names:?}");
            }
        }
        assert!(!names.iter().any(|n| n.ends_with("parent")), "{names:?}");
        assert_eq!(verify(&d).unwrap(), m);
        // The JSON names the links; the link list is part of the MAC input.
        let v = read_json(&d);
        assert_eq!(v["links"][0]["name"], "parent");
        assert_eq!(v["links"][0]["target"], "pre-3");
        // Round pages are deferred like top-level ones.
        let (_, rest) = verify_manifest_deferring(
            d.path(),
            &key(),
            "job-1",
            EXCLUDE,
            crate::security::follow::is_page_image,
        )
        .unwrap();
        assert_eq!(rest.bytes(), 3 * 10_000 + 3 * 1024 * 1024 + 17);
        rest.check().unwrap();
    }

    #[test]
    fn chain_links_are_exact() {
        assert!(chain_links(0).is_empty());
        let l = chain_links(2);
        assert_eq!(
            l,
            vec![
                ManifestLink {
                    name: "parent".into(),
                    target: "pre-2".into()
                },
                ManifestLink {
                    name: "pre-2/parent".into(),
                    target: "../pre-1".into()
                },
            ]
        );
        // Sorted by name even past 9 rounds ("pre-10" < "pre-2").
        let l = chain_links(12);
        assert!(l.windows(2).all(|w| w[0].name < w[1].name));
        assert_eq!(l.len(), 12);
        for bad in [
            "pre-0",
            "pre-01",
            "pre-",
            "pre-x",
            "pre--1",
            "pre-+1",
            "pre-65",
            "pre-99999999999",
        ] {
            assert_eq!(parse_round_dir(bad), None, "{bad}");
        }
        assert_eq!(parse_round_dir("pre-64"), Some(64));
    }

    #[test]
    fn flat_directories_keep_version_2_without_links() {
        let (d, m) = signed_dir();
        assert_eq!(m.version, MANIFEST_VERSION);
        assert!(m.links.is_empty());
        assert!(read_json(&d).get("links").is_none(), "v2 JSON unchanged");
        verify(&d).unwrap();
    }

    #[test]
    fn tampered_round_file_refused_naming_it() {
        let (d, _) = signed_chain(2);
        let p = d.path().join("pre-1/pages-1.img");
        let mut data = fs::read(&p).unwrap();
        data[77] ^= 1;
        fs::write(&p, data).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::HashMismatch { name } if name == "pre-1/pages-1.img"),
            "{err:?}"
        );

        let (d, _) = signed_chain(2);
        fs::write(d.path().join("pre-2/pagemap-1.img"), b"pagemaP").unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::HashMismatch { name } if name == "pre-2/pagemap-1.img"),
            "{err:?}"
        );
        // Even the round's log is sealed: only top-level names are exempt.
        let (d, _) = signed_chain(2);
        fs::write(d.path().join("pre-1/pre-dump.log"), b"rewritten\n").unwrap();
        assert!(verify(&d).is_err());
    }

    #[test]
    fn added_or_removed_round_file_refused() {
        let (d, _) = signed_chain(2);
        fs::write(d.path().join("pre-2/pages-9.img"), b"evil").unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::FileAdded { name } if name == "pre-2/pages-9.img"),
            "{err:?}"
        );
        // An excluded (log) name is exempt only at the top level.
        let (d, _) = signed_chain(2);
        fs::write(d.path().join("pre-1/dump.log"), b"x").unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::FileAdded { name } if name == "pre-1/dump.log"),
            "{err:?}"
        );
        let (d, _) = signed_chain(2);
        fs::remove_file(d.path().join("pre-1/pagemap-1.img")).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::FileMissing { name } if name == "pre-1/pagemap-1.img"),
            "{err:?}"
        );
    }

    #[test]
    fn retargeted_links_refused() {
        for (link, target) in [
            ("parent", "pre-1"),
            ("parent", "/etc"),
            ("parent", "../other-migration"),
            ("parent", "./pre-3"),
            ("pre-3/parent", "../pre-1"),
            ("pre-3/parent", "pre-2"),
            ("pre-2/parent", "../../../../etc"),
            ("pre-2/parent", "/tmp"),
        ] {
            let (d, _) = signed_chain(3);
            relink(&d.path().join(link), target);
            let err = verify(&d).unwrap_err();
            assert!(
                matches!(err, ManifestError::BadChain { .. }),
                "{link} -> {target}: {err:?}"
            );
        }
    }

    #[test]
    fn chain_shape_changes_refused() {
        // A link where round 1 has none.
        let (d, _) = signed_chain(2);
        std::os::unix::fs::symlink("../pre-2", d.path().join("pre-1/parent")).unwrap();
        assert!(matches!(
            verify(&d).unwrap_err(),
            ManifestError::BadChain { .. }
        ));

        // A symlink with another name, in a round or at the top.
        let (d, _) = signed_chain(2);
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("pre-1/pages-2.img")).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::NotRegularFile { name } if name == "pre-1/pages-2.img"),
            "{err:?}"
        );

        // A round directory swapped for a link to a copy elsewhere.
        let (d, _) = signed_chain(2);
        let elsewhere = tempfile::tempdir().unwrap();
        let copy = elsewhere.path().join("pre-1");
        fs::rename(d.path().join("pre-1"), &copy).unwrap();
        std::os::unix::fs::symlink(&copy, d.path().join("pre-1")).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::NotRegularFile { name } if name == "pre-1"),
            "{err:?}"
        );

        // A nested directory inside a round.
        let (d, _) = signed_chain(2);
        fs::create_dir(d.path().join("pre-2/sub")).unwrap();
        let err = verify(&d).unwrap_err();
        assert!(
            matches!(&err, ManifestError::NotRegularFile { name } if name == "pre-2/sub"),
            "{err:?}"
        );

        // An extra round, even a linked one, is not the signed chain.
        let (d, _) = signed_chain(2);
        let r3 = d.path().join("pre-3");
        fs::create_dir(&r3).unwrap();
        std::os::unix::fs::symlink("../pre-2", r3.join("parent")).unwrap();
        relink(&d.path().join("parent"), "pre-3");
        assert!(matches!(
            verify(&d).unwrap_err(),
            ManifestError::BadChain { .. }
        ));

        // A round removed, links repaired: still not the signed chain.
        let (d, _) = signed_chain(3);
        fs::remove_dir_all(d.path().join("pre-3")).unwrap();
        relink(&d.path().join("parent"), "pre-2");
        assert!(verify(&d).is_err());

        // The whole chain removed: a flat directory under a chain manifest.
        let (d, _) = signed_chain(1);
        fs::remove_dir_all(d.path().join("pre-1")).unwrap();
        fs::remove_file(d.path().join("parent")).unwrap();
        assert!(matches!(
            verify(&d).unwrap_err(),
            ManifestError::BadChain { .. }
        ));

        // A chain planted next to a flat (v2) manifest is refused as before.
        let (d, _) = signed_dir();
        fs::create_dir(d.path().join("pre-1")).unwrap();
        std::os::unix::fs::symlink("pre-1", d.path().join("parent")).unwrap();
        assert!(matches!(
            verify(&d).unwrap_err(),
            ManifestError::NotRegularFile { .. }
        ));
    }

    #[test]
    fn malformed_chain_is_never_signed() {
        let d = chain_dir(2);
        relink(&d.path().join("pre-2/parent"), "/etc");
        let err = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap_err();
        assert!(matches!(err, ManifestError::BadChain { .. }), "{err:?}");

        let d = chain_dir(2);
        fs::remove_dir_all(d.path().join("pre-1")).unwrap();
        let err = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap_err();
        assert!(matches!(err, ManifestError::BadChain { .. }), "{err:?}");

        // A parent link without rounds, or rounds without the top link.
        let d = image_dir();
        std::os::unix::fs::symlink("pre-1", d.path().join("parent")).unwrap();
        assert!(write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).is_err());
        let d = chain_dir(1);
        fs::remove_file(d.path().join("parent")).unwrap();
        let err = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap_err();
        assert!(matches!(err, ManifestError::BadChain { .. }), "{err:?}");

        // A round named off-pattern is just a subdirectory.
        let d = chain_dir(1);
        fs::create_dir(d.path().join("pre-01")).unwrap();
        let err = write_manifest(d.path(), &key(), "job-1", "mig-1", EXCLUDE).unwrap_err();
        assert!(
            matches!(&err, ManifestError::NotRegularFile { name } if name == "pre-01"),
            "{err:?}"
        );
    }

    #[test]
    fn edited_chain_manifest_refused_without_the_key() {
        // Drop a round's file from the manifest and the directory: the MAC
        // breaks.
        let (d, _) = signed_chain(2);
        fs::remove_file(d.path().join("pre-1/pages-1.img")).unwrap();
        let mut v = read_json(&d);
        let files = v["files"].as_array_mut().unwrap();
        files.retain(|f| f["name"] != "pre-1/pages-1.img");
        write_json(&d, &v);
        assert!(matches!(
            verify(&d).unwrap_err(),
            ManifestError::BadHmac { .. }
        ));

        // Downgrade to version 2 (dropping the links) breaks it too.
        let (d, _) = signed_chain(1);
        let mut v = read_json(&d);
        v["version"] = 2.into();
        v.as_object_mut().unwrap().remove("links");
        write_json(&d, &v);
        assert!(verify(&d).is_err());

        // Editing a link target in the manifest to match an edited link.
        let (d, _) = signed_chain(2);
        relink(&d.path().join("parent"), "pre-1");
        let mut v = read_json(&d);
        v["links"][0]["target"] = "pre-1".into();
        write_json(&d, &v);
        assert!(verify(&d).is_err());
    }

    #[test]
    fn hostile_signed_chain_manifests_refused() {
        // Signed by a buggy or compromised writer: still refused on shape.
        let (d, mut m) = signed_chain(2);
        m.links[0].target = "/etc".into();
        resign(&mut m);
        fs::write(
            d.path().join(MANIFEST_FILE_NAME),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            verify(&d).unwrap_err(),
            ManifestError::BadChain { .. }
        ));

        let (d, mut m) = signed_chain(2);
        m.links.push(ManifestLink {
            name: "pre-9/parent".into(),
            target: "../pre-8".into(),
        });
        resign(&mut m);
        fs::write(
            d.path().join(MANIFEST_FILE_NAME),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            verify(&d).unwrap_err(),
            ManifestError::BadChain { .. }
        ));

        for bad in [
            "pre-3/x.img",
            "pre-1/parent",
            "pre-1/a/b",
            "parent",
            "pre-2",
            "sub/x.img",
            "pre-1/../x",
        ] {
            let (d, mut m) = signed_chain(2);
            m.files[0].name = bad.to_string();
            m.files.sort_by(|a, b| a.name.cmp(&b.name));
            resign(&mut m);
            fs::write(
                d.path().join(MANIFEST_FILE_NAME),
                serde_json::to_vec(&m).unwrap(),
            )
            .unwrap();
            let err = verify(&d).unwrap_err();
            assert!(
                matches!(&err, ManifestError::InvalidFileName { name } if name == bad),
                "{bad:?}: {err:?}"
            );
        }

        // Links in a version 2 manifest are malformed, signed or not.
        let (d, mut m) = signed_dir();
        m.links = chain_links(1);
        resign(&mut m);
        fs::write(
            d.path().join(MANIFEST_FILE_NAME),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            verify(&d).unwrap_err(),
            ManifestError::ManifestMalformed { .. }
        ));
    }

    #[test]
    fn chain_mac_covers_links_and_differs_from_v2() {
        let base = Manifest {
            version: MANIFEST_VERSION_CHAIN,
            job_id: "j".into(),
            migration_id: "m".into(),
            created_unix_ms: 5,
            files: vec![],
            links: chain_links(2),
            hmac: String::new(),
        };
        let mac = |m: &Manifest| {
            compute_mac(&key(), m, Path::new("x"))
                .unwrap()
                .finalize()
                .into_bytes()
        };
        let mut other = base.clone();
        other.links[1].target = "../pre-0".into();
        assert_ne!(mac(&base), mac(&other));
        let mut shorter = base.clone();
        shorter.links = chain_links(1);
        assert_ne!(mac(&base), mac(&shorter));
        let mut flat = base.clone();
        flat.version = MANIFEST_VERSION;
        flat.links.clear();
        let mut chain_no_links = base.clone();
        chain_no_links.links.clear();
        assert_ne!(mac(&flat), mac(&chain_no_links), "domain tags differ");
    }
}
