//! `mosctl kill [-s SIG] JOB` and `mosctl kill -l`
//!
//! Signals are taken as kill(1) takes them: a name with or without `SIG`,
//! in any case (`KILL`, `SIGKILL`, `kill`), or a number (`9`, and real-time
//! signals by number). Names are resolved here, on the caller's side, with
//! this machine's numbering: the agents only ever see a number, so the API
//! stays as it was and a name that means nothing is refused before any node
//! is asked.

use crate::api::pb;
use crate::cli::common::{status_err, Ctx};
use nix::sys::signal::Signal;
use std::path::Path;
use std::str::FromStr;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job id (or the host pid of a job's init).
    #[arg(required_unless_present = "list")]
    pub job: Option<String>,
    /// Signal: a name (KILL, SIGKILL, kill, TERM, ...) or a number.
    #[arg(long, short, default_value = "KILL", value_parser = parse_signal)]
    pub signal: i32,
    /// List the signal names with their numbers, like `kill -l`.
    #[arg(long, short = 'l', conflicts_with = "job")]
    pub list: bool,
}

/// The highest signal number Linux has (SIGRTMAX).
const MAX_SIGNAL: i32 = 64;

/// Parse a signal as kill(1) does: `9`, `KILL`, `SIGKILL`, `kill`, `sigkill`.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return match t.parse::<i32>() {
            Ok(n) if (1..=MAX_SIGNAL).contains(&n) => Ok(n),
            _ => Err(format!(
                "{s:?} is not a signal number (1-{MAX_SIGNAL}); `mosctl kill -l` lists them"
            )),
        };
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    Signal::from_str(&format!("SIG{name}"))
        .map(|sig| sig as i32)
        .map_err(|_| format!("unknown signal {s:?}; `mosctl kill -l` lists the names"))
}

/// `kill -l`'s table: "NUMBER NAME" for every standard signal, names without
/// `SIG`.
pub fn signal_table() -> Vec<(i32, &'static str)> {
    Signal::iterator()
        .map(|sig| {
            let name = sig.as_str();
            (sig as i32, name.strip_prefix("SIG").unwrap_or(name))
        })
        .collect()
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    if a.list {
        use std::io::Write;
        let table: String = signal_table()
            .into_iter()
            .map(|(n, name)| format!("{n:>2}) {name}\n"))
            .collect();
        // One write, and a closed pipe (`mosctl kill -l | head`) is no error.
        let _ = std::io::stdout().lock().write_all(table.as_bytes());
        return Ok(());
    }
    let Some(job_arg) = a.job else {
        anyhow::bail!("a job id is required (or -l to list signals)");
    };
    let ctx = Ctx::load(cluster)?;
    let job = ctx.find_job(&job_arg).await?;
    let mut c = ctx.agent(&job.node).await?;
    c.signal(pb::SignalRequest {
        job_id: job.id.clone(),
        signal: a.signal,
    })
    .await
    .map_err(|s| status_err(&format!("signalling {}", job.id), s))?;
    let name = signal_table()
        .into_iter()
        .find(|(n, _)| *n == a.signal)
        .map(|(_, name)| format!(" (SIG{name})"))
        .unwrap_or_default();
    println!(
        "sent signal {}{name} to {} on {}",
        a.signal, job.id, job.node
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_as_kill_takes_them() {
        for s in ["KILL", "SIGKILL", "kill", "sigkill", "9", " Kill "] {
            assert_eq!(parse_signal(s), Ok(9), "{s}");
        }
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("usr1"), Ok(libc::SIGUSR1));
        assert_eq!(parse_signal("34"), Ok(34), "real-time signals by number");
        for bad in ["", "0", "65", "-9", "NOPE", "SIG", "9x"] {
            let e = parse_signal(bad).unwrap_err();
            assert!(e.contains("kill -l"), "{bad}: {e}");
        }
    }

    #[test]
    fn table_has_the_usual_names() {
        let t = signal_table();
        assert!(t.contains(&(9, "KILL")));
        assert!(t.contains(&(15, "TERM")));
        assert!(t.iter().all(|(_, n)| !n.starts_with("SIG")));
    }
}
