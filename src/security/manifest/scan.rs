//! Listing an image directory for a manifest: every regular file, and for a
//! pre-copy chain the round directories and `parent` links, read and never
//! followed (see the parent module's "Pre-copy chains").

use super::{
    chain_links, io_err, parse_round_dir, round_dir_name, ManifestError, ManifestLink,
    MANIFEST_FILE_NAME, PARENT_LINK,
};
use std::collections::BTreeMap;
use std::fs::{self, Metadata};
use std::path::Path;

/// What [`scan_tree`] found: regular files by relative name, `parent`
/// links with their (unfollowed) targets, and round directories.
pub(super) struct Scan {
    pub(super) files: BTreeMap<String, Metadata>,
    pub(super) links: BTreeMap<String, String>,
    pub(super) rounds: std::collections::BTreeSet<u32>,
}

/// Lists the directory (not following symlinks) and returns every entry
/// except the manifest itself, refusing anything that is not a regular file.
/// With `chain`, `parent` symlinks and `pre-<k>` round directories (one
/// level, holding regular files and their own `parent` link) are collected
/// too, for [`check_chain_shape`]; links are read, never followed.
pub(super) fn scan_tree(dir: &Path, chain: bool) -> Result<Scan, ManifestError> {
    let mut scan = Scan {
        files: BTreeMap::new(),
        links: BTreeMap::new(),
        rounds: Default::default(),
    };
    scan_level(dir, "", chain, &mut scan)?;
    Ok(scan)
}

fn scan_level(dir: &Path, prefix: &str, chain: bool, scan: &mut Scan) -> Result<(), ManifestError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name =
            entry
                .file_name()
                .into_string()
                .map_err(|os| ManifestError::InvalidFileName {
                    name: format!("{prefix}{}", os.to_string_lossy()),
                })?;
        if prefix.is_empty() && name == MANIFEST_FILE_NAME {
            continue;
        }
        let rel = format!("{prefix}{name}");
        // DirEntry::metadata does not follow symlinks (lstat semantics).
        let meta = entry.metadata().map_err(io_err(entry.path()))?;
        let ft = meta.file_type();
        // Excluded names are checked too: CRIU later *writes* its log there,
        // and a planted symlink would redirect that write anywhere.
        if ft.is_file() {
            scan.files.insert(rel, meta);
        } else if chain && ft.is_symlink() && name == PARENT_LINK {
            let target = fs::read_link(entry.path()).map_err(io_err(entry.path()))?;
            let target =
                target
                    .into_os_string()
                    .into_string()
                    .map_err(|t| ManifestError::BadChain {
                        reason: format!("link {rel:?} has a non-UTF-8 target {t:?}"),
                    })?;
            scan.links.insert(rel, target);
        } else if chain && ft.is_dir() && prefix.is_empty() && parse_round_dir(&name).is_some() {
            if let Some(k) = parse_round_dir(&name) {
                scan.rounds.insert(k);
            }
            scan_level(&entry.path(), &format!("{name}/"), chain, scan)?;
        } else {
            return Err(ManifestError::NotRegularFile { name: rel });
        }
    }
    Ok(())
}

/// The number of rounds of the chain `scan` found (0 for a flat directory),
/// after checking it has exactly the layout of the module docs: rounds
/// `pre-1..pre-N` all present and every link exactly as expected. Done on
/// the write side too, so a malformed chain is never signed.
pub(super) fn check_chain_shape(scan: &Scan) -> Result<u32, ManifestError> {
    let n = scan.rounds.len() as u32;
    if n == 0 && scan.links.is_empty() {
        return Ok(0);
    }
    if scan.rounds.iter().copied().ne(1..=n) {
        return Err(ManifestError::BadChain {
            reason: format!(
                "round directories {:?} are not pre-1..pre-{n}",
                scan.rounds
                    .iter()
                    .map(|k| round_dir_name(*k))
                    .collect::<Vec<_>>()
            ),
        });
    }
    let found: Vec<ManifestLink> = scan
        .links
        .iter()
        .map(|(name, target)| ManifestLink {
            name: name.clone(),
            target: target.clone(),
        })
        .collect();
    let expected = chain_links(n);
    if found != expected {
        let differs = expected
            .iter()
            .find(|l| !found.contains(l))
            .map(|l| format!("expected link {:?} -> {:?}", l.name, l.target))
            .or_else(|| {
                found
                    .iter()
                    .find(|l| !expected.contains(l))
                    .map(|l| format!("unexpected link {:?} -> {:?}", l.name, l.target))
            })
            .unwrap_or_default();
        return Err(ManifestError::BadChain {
            reason: format!(
                "a {n}-round chain must link parent -> pre-{n} -> ... -> pre-1: {differs}"
            ),
        });
    }
    Ok(n)
}
