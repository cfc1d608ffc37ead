//! Summary statistics the benchmark binaries report, and the CPU time processes spent, so
//! a benchmark can show where the cycles of a run went (on a machine with few cores every
//! process of a path competes for the same CPUs).

/// The median (upper median for an even count); `NaN` for no samples.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `p` quantile (0.0 to 1.0) by nearest rank; `NaN` for no samples.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// CPU time (user + system, seconds) process `pid` has used so far, from `/proc/PID/stat`.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat)
}

/// Resident set size of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// Peak resident set size of process `pid` (`VmHWM` of `/proc/PID/status`), in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    use anyhow::Context;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmHWM in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// utime + stime of a `/proc/PID/stat` line, in seconds (Linux counts in USER_HZ = 100).
fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU time used by named processes between [`CpuMeter::start`] and [`CpuMeter::stop`].
pub struct CpuMeter {
    start: Vec<(&'static str, u32, f64)>,
}

impl CpuMeter {
    /// Starts measuring `procs` (name, pid).
    pub fn start(procs: &[(&'static str, u32)]) -> Self {
        Self {
            start: procs
                .iter()
                .map(|&(n, pid)| (n, pid, cpu_secs(pid).unwrap_or(f64::NAN)))
                .collect(),
        }
    }

    /// CPU seconds each process used since the start.
    pub fn stop(&self) -> Vec<(&'static str, f64)> {
        self.start
            .iter()
            .map(|&(n, pid, t0)| (n, cpu_secs(pid).unwrap_or(f64::NAN) - t0))
            .collect()
    }
}

/// Waits (at most a minute) until processes `pids` together use under 5% of a core, so
/// that work one run left behind (a registry still storing a history backlog) is charged
/// to that run and does not slow the next.
pub async fn settle(pids: &[u32]) {
    let total = || pids.iter().filter_map(|p| cpu_secs(*p)).sum::<f64>();
    let step = std::time::Duration::from_millis(250);
    for _ in 0..240 {
        let before = total();
        tokio::time::sleep(step).await;
        if total() - before < 0.05 * step.as_secs_f64() {
            return;
        }
    }
}

/// `name 0.52 s, name 0.48 s, ...`: CPU seconds per unit of work.
pub fn cpu_line(used: &[(&'static str, f64)], per: f64) -> String {
    used.iter()
        .map(|(n, s)| format!("{n} {:.2}", s / per))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "4242 (tokio (rt) worker) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 4 0 99";
        assert_eq!(super::parse_stat_cpu(line), Some(1.75));
        assert_eq!(super::parse_stat_cpu("1 (x) S 1"), None);
        let own = super::cpu_secs(std::process::id()).expect("own stat");
        assert!(own >= 0.0);
        let rss = super::rss_bytes(std::process::id()).expect("own RSS");
        assert!(rss > 1 << 20, "{rss} bytes");
    }

    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(vec![]).is_nan());
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 51.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut v, 1.0), 100.0);
    }
}
