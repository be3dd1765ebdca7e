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
    let t = stat_times(pid);
    (t[0], t[1])
}

/// As [`process_times`], with the children the process has waited for added.
// Used by the relay bench, not the pool bench, which shares this file.
#[allow(dead_code)]
pub fn process_times_with_children(pid: u32) -> (f64, f64) {
    let t = stat_times(pid);
    (t[0] + t[2], t[1] + t[3])
}

/// utime, stime, cutime and cstime of a process, in seconds.
fn stat_times(pid: u32) -> [f64; 4] {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime, stime, cutime and cstime are fields 14 to 17 of stat; counted after the ')'
    // they are 11 to 14.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    [11, 12, 13, 14].map(|i| field(i) as f64 / 100.0)
}
