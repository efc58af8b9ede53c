//! Durations as people write them (`30s`, `5m`, `1h30m`, `500ms`), for
//! `mosrun --checkpoint-every`. A small parser of our own, in the style of
//! the `humantime` crate, so the command line needs no new dependency.

use std::time::Duration;

/// Parse `30s`, `5m`, `2h`, `1h30m`, `1500ms`, `1d`. A bare number is
/// refused (seconds or milliseconds? say which).
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration: give e.g. 30s, 5m or 1h".into());
    }
    let mut total: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "bad duration {s:?}: expected a number at {rest:?} (e.g. 30s, 5m, 1h30m)"
            ));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let ms: u128 = match unit {
            "ms" => 1,
            "s" | "sec" | "secs" => 1000,
            "m" | "min" | "mins" => 60_000,
            "h" | "hr" | "hrs" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "bad duration {s:?}: a unit is needed after {n} (ms, s, m, h or d)"
                ))
            }
            u => {
                return Err(format!(
                    "bad duration {s:?}: unknown unit {u:?} (use ms, s, m, h or d)"
                ))
            }
        };
        total = n
            .checked_mul(ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("bad duration {s:?}: too large"))?;
    }
    let ms = u64::try_from(total).map_err(|_| format!("bad duration {s:?}: too large"))?;
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::time::Duration;

    #[test]
    fn people_durations() {
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse(" 2h ").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn bad_durations_say_why() {
        for (s, why) in [
            ("", "empty"),
            ("30", "unit is needed"),
            ("5x", "unknown unit"),
            ("s", "expected a number"),
            ("-5s", "expected a number"),
            ("99999999999999999999999999999999999999999h", "too large"),
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }
}
