//! Reading `/proc/<pid>/status`, which several parts consult for one field
//! each (a tracer, a parent, a namespace pid, a memory size).

/// The value of `key` (without its colon, e.g. `"PPid"`) in
/// `/proc/<pid>/status`, trimmed; None if the process or the field is gone.
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().to_string())
    })
}

/// [`status_field`] parsed as a number (the first word, so `"1234 kB"` is 1234).
pub fn status_number<T: std::str::FromStr>(pid: i32, key: &str) -> Option<T> {
    status_field(pid, key)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_fields() {
        let me = std::process::id() as i32;
        assert_eq!(status_number::<i32>(me, "Pid"), Some(me));
        assert!(status_number::<u64>(me, "VmRSS").is_some_and(|kib| kib > 0));
        assert_eq!(status_field(me, "NoSuchField"), None);
        // A prefix of a real key is not that key.
        assert_eq!(status_field(me, "Vm"), None);
    }
}
