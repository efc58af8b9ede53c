//! What `mosmake` needs to know about make's own arguments: whether the user
//! chose `-j`, and a `SHELL=` override (which becomes the real shell behind
//! `mosmake-sh`, so a Makefile run with `SHELL=/bin/bash` still gets bash).

/// Short options of GNU make that take the rest of the word (or the next
/// word) as their value; a `j` after one of them is part of that value.
const SHORT_WITH_VALUE: &str = "CfIoWlOE";

/// Whether make's arguments or `MAKEFLAGS` already set the job count.
pub fn user_sets_jobs(args: &[String], makeflags: Option<&str>) -> bool {
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        if a == "--jobs" || a.starts_with("--jobs=") {
            return true;
        }
        if a.starts_with("--") || !a.starts_with('-') || a == "-" {
            continue;
        }
        match short_flags_have_j(&a[1..]) {
            ShortScan::J => return true,
            ShortScan::ValueNext => skip_next = true,
            ShortScan::No => {}
        }
    }
    if let Some(mf) = makeflags {
        // MAKEFLAGS' first word may be bare flag letters ("kj4"); later words
        // are options or variable assignments.
        for (i, w) in mf.split_whitespace().enumerate() {
            if w == "--" {
                break;
            }
            if w.starts_with("--jobs") {
                return true;
            }
            let letters = if let Some(l) = w.strip_prefix('-') {
                if l.starts_with('-') {
                    continue;
                }
                l
            } else if i == 0 && !w.contains('=') {
                w
            } else {
                continue;
            };
            if let ShortScan::J = short_flags_have_j(letters) {
                return true;
            }
        }
    }
    false
}

enum ShortScan {
    J,
    /// The word ended with an option whose value is the next word.
    ValueNext,
    No,
}

fn short_flags_have_j(letters: &str) -> ShortScan {
    for (i, c) in letters.char_indices() {
        if c == 'j' {
            return ShortScan::J;
        }
        if SHORT_WITH_VALUE.contains(c) {
            return if i + c.len_utf8() == letters.len() {
                ShortScan::ValueNext
            } else {
                ShortScan::No
            };
        }
    }
    ShortScan::No
}

/// Remove `SHELL=…` assignments from make's arguments; returns the last one's
/// value (make would use the last too).
pub fn take_shell_override(args: &mut Vec<String>) -> Option<String> {
    let mut shell = None;
    args.retain(|a| match a.strip_prefix("SHELL=") {
        Some(v) => {
            shell = Some(v.to_string());
            false
        }
        None => true,
    });
    shell
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_jobs_in_every_spelling() {
        for a in [
            &["-j"][..],
            &["-j8"],
            &["-j", "8"],
            &["--jobs"],
            &["--jobs=3"],
            &["-kj4"],
            &["all", "-sj2"],
        ] {
            assert!(user_sets_jobs(&v(a), None), "{a:?}");
        }
        for a in [
            &[][..],
            &["all"],
            &["-k"],
            &["-Cproj"],
            &["-C", "-j-dir"][..],
            &["-fjunk.mk"],
            &["JOBS=-j4"],
            &["--keep-going"],
        ] {
            assert!(!user_sets_jobs(&v(a), None), "{a:?}");
        }
    }

    #[test]
    fn finds_jobs_in_makeflags() {
        assert!(user_sets_jobs(&[], Some("-j4")));
        assert!(user_sets_jobs(&[], Some("kj4")));
        assert!(user_sets_jobs(&[], Some(" -k --jobs=2")));
        assert!(!user_sets_jobs(&[], Some("k -- J=-j4")));
        assert!(!user_sets_jobs(&[], Some("")));
        assert!(!user_sets_jobs(&[], Some("X=j")));
    }

    #[test]
    fn shell_override_is_taken_out() {
        let mut a = v(&["all", "SHELL=/bin/dash", "CC=gcc", "SHELL=/bin/bash"]);
        assert_eq!(take_shell_override(&mut a).as_deref(), Some("/bin/bash"));
        assert_eq!(a, v(&["all", "CC=gcc"]));
        let mut a = v(&["all"]);
        assert_eq!(take_shell_override(&mut a), None);
    }
}
