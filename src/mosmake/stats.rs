//! The per-run lines `mosrun` appends to `$MOSIX_RUN_STATS`, and the summary
//! `mosmake` prints from them.
//!
//! Format (one line per finished `mosrun`, space-separated `key=value`,
//! unknown keys ignored so the line can grow):
//!
//! ```text
//! node=NODE job=JOBID place_ms=F start_ms=F total_ms=F exit=N reruns=K [queue_ms=F] [cpu_ms=F]
//! ```
//!
//! `start_ms` is the per-start overhead (from `mosrun` starting to the job
//! running), `place_ms` the placement decision within it, `reruns` how many
//! times the job was started again elsewhere after its node was lost,
//! `queue_ms` (optional) how long it waited for a free slot, `cpu_ms`
//! (optional) the CPU the `mosrun` client itself used on the home node.

use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq)]
pub struct RunStat {
    pub node: String,
    pub job: String,
    pub place_ms: f64,
    pub start_ms: f64,
    pub total_ms: f64,
    pub exit: i32,
    pub reruns: u32,
    pub queue_ms: Option<f64>,
    pub cpu_ms: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("malformed run-stats line {line:?}: {why}")]
pub struct ParseError {
    pub line: String,
    pub why: String,
}

impl RunStat {
    pub fn parse(line: &str) -> Result<Self, ParseError> {
        let err = |why: String| ParseError {
            line: line.to_string(),
            why,
        };
        let mut kv = BTreeMap::new();
        for tok in line.split_whitespace() {
            let (k, v) = tok
                .split_once('=')
                .ok_or_else(|| err(format!("{tok:?} is not key=value")))?;
            kv.insert(k, v);
        }
        let get = |k: &str| kv.get(k).copied().ok_or_else(|| err(format!("no {k}=")));
        fn num<T: std::str::FromStr>(
            k: &str,
            v: &str,
            err: &dyn Fn(String) -> ParseError,
        ) -> Result<T, ParseError> {
            v.parse()
                .map_err(|_| err(format!("{k}={v:?} is not a number")))
        }
        Ok(RunStat {
            node: get("node")?.to_string(),
            job: get("job")?.to_string(),
            place_ms: num("place_ms", get("place_ms")?, &err)?,
            start_ms: num("start_ms", get("start_ms")?, &err)?,
            total_ms: num("total_ms", get("total_ms")?, &err)?,
            exit: num("exit", get("exit")?, &err)?,
            reruns: kv
                .get("reruns")
                .map(|v| num("reruns", v, &err))
                .transpose()?
                .unwrap_or(0),
            queue_ms: kv
                .get("queue_ms")
                .map(|v| num("queue_ms", v, &err))
                .transpose()?,
            cpu_ms: kv
                .get("cpu_ms")
                .map(|v| num("cpu_ms", v, &err))
                .transpose()?,
        })
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted values; None if empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// What one `mosmake` run did, for its closing summary.
#[derive(Debug, Default)]
pub struct Summary {
    pub runs: Vec<RunStat>,
    /// Lines of the stats file that did not parse (reported, not fatal).
    pub malformed: Vec<ParseError>,
    /// Lines `mosmake-sh` sent through mosrun / ran locally.
    pub sent_remote: u64,
    pub ran_local: u64,
    pub makespan_s: f64,
    pub jobs_flag: String,
}

impl Summary {
    pub fn from_text(stats: &str) -> Self {
        let mut s = Summary::default();
        for line in stats.lines().filter(|l| !l.trim().is_empty()) {
            match RunStat::parse(line) {
                Ok(r) => s.runs.push(r),
                Err(e) => s.malformed.push(e),
            }
        }
        s
    }

    /// Count `mosmake-sh`'s decisions: one `R` or `L` line each.
    pub fn add_decisions(&mut self, log: &str) {
        for l in log.lines() {
            match l.trim() {
                "R" => self.sent_remote += 1,
                "L" => self.ran_local += 1,
                _ => {}
            }
        }
    }

    pub fn jobs_per_node(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in &self.runs {
            *m.entry(r.node.clone()).or_insert(0) += 1;
        }
        m
    }

    /// The closing report, one `mosmake:` line per fact.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "mosmake: makespan {:.1} s ({}); {} compile line(s) sent through mosrun, {} other hooked line(s) run locally",
            self.makespan_s, self.jobs_flag, self.sent_remote, self.ran_local
        );
        let per_node = self
            .jobs_per_node()
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "mosmake: jobs per node: {}",
            if per_node.is_empty() {
                "none ran remotely".to_string()
            } else {
                per_node
            }
        );
        let starts: Vec<f64> = self.runs.iter().map(|r| r.start_ms).collect();
        let places: Vec<f64> = self.runs.iter().map(|r| r.place_ms).collect();
        if let (Some(p50), Some(p90), Some(p99)) = (
            percentile(&starts, 50.0),
            percentile(&starts, 90.0),
            percentile(&starts, 99.0),
        ) {
            let _ = writeln!(
                o,
                "mosmake: per-start overhead: p50 {p50:.1} ms, p90 {p90:.1} ms, p99 {p99:.1} ms (placement p99 {:.1} ms) over {} starts",
                percentile(&places, 99.0).unwrap_or(0.0),
                starts.len()
            );
        }
        let queued: Vec<f64> = self.runs.iter().filter_map(|r| r.queue_ms).collect();
        if let (Some(p50), Some(p99)) = (percentile(&queued, 50.0), percentile(&queued, 99.0)) {
            let _ = writeln!(
                o,
                "mosmake: waiting for a free slot: p50 {p50:.1} ms, p99 {p99:.1} ms"
            );
        }
        let cpu: Vec<f64> = self.runs.iter().filter_map(|r| r.cpu_ms).collect();
        if let (Some(p50), Some(p99)) = (percentile(&cpu, 50.0), percentile(&cpu, 99.0)) {
            let mean = cpu.iter().sum::<f64>() / cpu.len() as f64;
            let _ = writeln!(
                o,
                "mosmake: mosrun client CPU on this node per start: mean {mean:.1} ms, p50 {p50:.1} ms, p99 {p99:.1} ms"
            );
        }
        for r in self.runs.iter().filter(|r| r.reruns > 0) {
            let _ = writeln!(
                o,
                "mosmake: job {} was re-run {} time(s) after losing its node; it finished on {} (exit {})",
                r.job, r.reruns, r.node, r.exit
            );
        }
        let unaccounted = self.sent_remote.saturating_sub(self.runs.len() as u64);
        if unaccounted > 0 {
            let _ = writeln!(
                o,
                "mosmake: {unaccounted} compile line(s) sent through mosrun left no stats line (mosrun failed before the job ran, or was killed)"
            );
        }
        for e in &self.malformed {
            let _ = writeln!(o, "mosmake: ignored {e}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L1: &str = "node=node2 job=j1 place_ms=0.4 start_ms=9.5 total_ms=300 exit=0 reruns=0";

    #[test]
    fn parses_the_contract_line() {
        let r = RunStat::parse(L1).unwrap();
        assert_eq!(r.node, "node2");
        assert_eq!(r.job, "j1");
        assert_eq!(r.start_ms, 9.5);
        assert_eq!(r.exit, 0);
        assert_eq!(r.reruns, 0);
        // Unknown keys and another order are fine; reruns may be missing.
        let r = RunStat::parse("exit=1 job=j2 node=node3 place_ms=1 start_ms=2 total_ms=3 new=x")
            .unwrap();
        assert_eq!((r.node.as_str(), r.exit, r.reruns), ("node3", 1, 0));
    }

    #[test]
    fn rejects_broken_lines() {
        assert!(RunStat::parse("node=node1 job=j").is_err());
        assert!(RunStat::parse("garbage").is_err());
        let e = RunStat::parse("node=a job=b place_ms=x start_ms=1 total_ms=1 exit=0").unwrap_err();
        assert!(e.why.contains("place_ms"), "{e}");
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[7.0], 0.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_counts_nodes_reruns_and_losses() {
        let text = format!(
            "{L1}\nnode=node3 job=j2 place_ms=1 start_ms=20 total_ms=5 exit=0 reruns=1\nbad line\n{}\n",
            L1.replace("j1", "j3")
        );
        let mut s = Summary::from_text(&text);
        s.add_decisions("R\nR\nR\nR\nL\nL\n");
        s.jobs_flag = "-j4".into();
        assert_eq!(s.runs.len(), 3);
        assert_eq!(s.malformed.len(), 1);
        let per = s.jobs_per_node();
        assert_eq!(per["node2"], 2);
        assert_eq!(per["node3"], 1);
        let out = s.render();
        assert!(out.contains("jobs per node: node2 2, node3 1"), "{out}");
        assert!(out.contains("job j2 was re-run 1 time(s)"), "{out}");
        assert!(
            out.contains("1 compile line(s) sent through mosrun left no stats line"),
            "{out}"
        );
        assert!(out.contains("p50 9.5 ms"), "{out}");
        assert!(
            out.contains(
                "4 compile line(s) sent through mosrun, 2 other hooked line(s) run locally"
            ),
            "{out}"
        );
        assert!(!out.contains("waiting for a free slot"), "{out}");
        assert!(!out.contains("client CPU"), "{out}");
        let q = Summary::from_text(&format!(
            "{L1} queue_ms=40 cpu_ms=3\n{L1} queue_ms=2 cpu_ms=5\n"
        ));
        assert_eq!(q.runs[0].queue_ms, Some(40.0));
        assert_eq!(q.runs[1].cpu_ms, Some(5.0));
        let out = q.render();
        assert!(
            out.contains("waiting for a free slot: p50 2.0 ms, p99 40.0 ms"),
            "{out}"
        );
        assert!(
            out.contains("client CPU on this node per start: mean 4.0 ms, p50 3.0 ms, p99 5.0 ms"),
            "{out}"
        );
    }
}
