//! The standard `process_*` metrics (the names and meanings every
//! Prometheus client library exports, so existing dashboards and alerts
//! work unchanged), read from `/proc/self` at scrape time.

/// One reading of this process's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Process {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    /// The soft limit on open files.
    pub max_fds: u64,
    /// Since the Unix epoch, seconds.
    pub start_time_seconds: f64,
    pub threads: u64,
}

impl Process {
    /// This process now; `None` where `/proc` is not there (not Linux).
    pub fn read() -> Option<Process> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let mut p = parse(
            &stat,
            &boot,
            &limits,
            u64::try_from(ticks).ok()?,
            u64::try_from(page).ok()?,
        )?;
        // (Minus the descriptor read_dir held while counting.)
        p.open_fds = open_fds.saturating_sub(1);
        Some(p)
    }
}

/// From the texts of `/proc/self/stat`, `/proc/stat` and
/// `/proc/self/limits` (see proc(5)).
fn parse(stat: &str, boot: &str, limits: &str, ticks: u64, page: u64) -> Option<Process> {
    // The command name (field 2) is in parentheses and may hold spaces:
    // the fields that follow are counted from its closing one.
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): field n is f[n - 3].
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    let ticks = ticks.max(1) as f64;
    let btime: u64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|soft| match soft {
            "unlimited" => Some(u64::MAX),
            n => n.parse().ok(),
        })
        .unwrap_or(0);
    Some(Process {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: btime as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        open_fds: 0,
        max_fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_texts_give_the_standard_figures() {
        // A command name with a space and a parenthesis, as proc(5) allows.
        let stat = "4242 (edge (ferry) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 7 0 12000 104857600 2560 18446744073709551615";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            16384                524288               files\n";
        let p = parse(stat, boot, limits, 100, 4096).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.start_time_seconds, 1_700_000_120.0);
        assert_eq!(p.virtual_bytes, 104_857_600);
        assert_eq!(p.resident_bytes, 2560 * 4096);
        assert_eq!(p.max_fds, 16384);
    }

    #[test]
    fn this_process_reads_as_itself() {
        let p = Process::read().expect("Linux has /proc");
        assert!(p.resident_bytes > 1 << 20 && p.virtual_bytes >= p.resident_bytes);
        assert!(p.open_fds >= 3 && p.max_fds >= p.open_fds, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86_400.0);
    }
}
