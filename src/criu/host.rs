//! Host settings CRIU depends on that `criu check` does not report.
//!
//! **Pipe size for post-copy.** CRIU's lazy-pages page server (source side of
//! a post-copy migration) reads pages out of its page pipes through a "tee
//! pipe" that it resizes to `PIPE_MAX_SIZE` pages (819 pages on x86-64, which
//! the kernel rounds up to 4 MiB). Above `fs.pipe-max-size` (1 MiB by default)
//! that resize needs `CAP_SYS_RESOURCE`, which root lacks in some containers
//! and VMs. CRIU 4.2.1 ignores the failed resize, and the first page request
//! then fails with "page-pipe: tee: 65536" or "page-pipe: splice: Bad file
//! descriptor". So the agent raises `fs.pipe-max-size` to 4 MiB when it is
//! lower, and reports post-copy unavailable when it cannot.

use std::path::Path;

/// What CRIU's tee pipe asks for, after the kernel's power-of-two rounding.
pub const LAZY_PIPE_BYTES: u64 = 4 << 20;

const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

/// Make sure pipes of [`LAZY_PIPE_BYTES`] can be made without
/// `CAP_SYS_RESOURCE`; raise the sysctl if needed. Returns why not, if not.
pub fn ensure_pipe_max_size() -> Result<(), String> {
    ensure_at_least(Path::new(PIPE_MAX_SIZE), LAZY_PIPE_BYTES)
}

fn ensure_at_least(knob: &Path, want: u64) -> Result<(), String> {
    let current = read_u64(knob)?;
    if current >= want {
        return Ok(());
    }
    std::fs::write(knob, want.to_string()).map_err(|e| {
        format!(
            "{} is {current} and raising it to {want} failed ({e}); CRIU's post-copy page server needs {want}-byte pipes",
            knob.display()
        )
    })?;
    let now = read_u64(knob)?;
    if now < want {
        return Err(format!(
            "{} stays at {now} after writing {want}",
            knob.display()
        ));
    }
    tracing::info!(
        "raised {} from {current} to {now}: CRIU's post-copy page server needs {want}-byte pipes",
        knob.display()
    );
    Ok(())
}

fn read_u64(knob: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(knob)
        .map_err(|e| format!("cannot read {}: {e}", knob.display()))?;
    text.trim()
        .parse()
        .map_err(|e| format!("{} holds {:?}: {e}", knob.display(), text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_a_low_value_and_keeps_a_high_one() {
        let dir = tempfile::tempdir().unwrap();
        let knob = dir.path().join("pipe-max-size");
        std::fs::write(&knob, "1048576\n").unwrap();
        ensure_at_least(&knob, LAZY_PIPE_BYTES).unwrap();
        assert_eq!(read_u64(&knob).unwrap(), LAZY_PIPE_BYTES);
        std::fs::write(&knob, "16777216").unwrap();
        ensure_at_least(&knob, LAZY_PIPE_BYTES).unwrap();
        assert_eq!(read_u64(&knob).unwrap(), 16 << 20, "never lowered");
    }

    #[test]
    fn unreadable_or_garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(ensure_at_least(&missing, 1)
            .unwrap_err()
            .contains("cannot read"));
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "lots").unwrap();
        assert!(ensure_at_least(&bad, 1).unwrap_err().contains("lots"));
    }
}
