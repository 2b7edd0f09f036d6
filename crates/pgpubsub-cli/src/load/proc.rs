//! CPU time and memory of a child process, read from /proc (Linux): CPU as
//! the sum of every thread's run time in nanoseconds (`task/*/schedstat`,
//! far finer than the 10 ms ticks of `stat`), memory as resident set size.

/// A process' CPU and memory at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// CPU time of all its threads, nanoseconds.
    pub cpu_ns: u64,
    /// Resident set size now, bytes.
    pub rss: u64,
    /// Peak resident set size so far (VmHWM), bytes.
    pub peak_rss: u64,
}

/// Reads the usage of `pid`; `None` once it has exited (or off Linux).
pub fn usage(pid: u32) -> Option<Usage> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let cpu_ns = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Some(Usage { cpu_ns, rss: kb("VmRSS:"), peak_rss: kb("VmHWM:") })
}
