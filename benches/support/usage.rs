//! What a process has used, from /proc (Linux): peak RSS and CPU time.

/// A `Key:   value kB` line of a /proc status file.
pub fn status_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Peak RSS (KiB) and CPU seconds (user + system) of a process.
pub fn process_usage(pid: u32) -> (u64, f64) {
    let hwm = status_kib(&format!("/proc/{pid}/status"), "VmHWM:");
    let (user, system) = process_times(pid);
    (hwm, user + system)
}

/// CPU seconds of a process in user and in system (kernel) mode, in 10 ms clock ticks.
pub fn process_times(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat; counted after the ')' they are 11 and 12.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field(11) as f64 / 100.0, field(12) as f64 / 100.0)
}
