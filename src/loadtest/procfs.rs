//! What the processes cost, from `/proc`: CPU time and resident memory of the service
//! (found by its listening port, or given), of PostgreSQL's processes and of this tool, the
//! whole machine's busy time, and what machine this is.

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Milliseconds of CPU in `ticks` clock ticks.
pub fn ticks_to_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / ticks_per_second()
}

/// `(comm, utime + stime)` of a process, in clock ticks.
fn stat(pid: u32) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 2..)?.split_whitespace().collect();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU time of `pid` in clock ticks (0 when it is gone).
pub fn cpu_ticks(pid: u32) -> u64 {
    stat(pid).map(|s| s.1).unwrap_or(0)
}

/// `(VmRSS, VmHWM)` of `pid` in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// CPU ticks of every process whose command name is `postgres` (the server and its backends).
/// Backends that ended between two readings take their time with them, so this is a lower
/// bound when connections come and go; the service's pool keeps its connections.
pub fn postgres_ticks() -> u64 {
    pids()
        .into_iter()
        .filter_map(stat)
        .filter(|(comm, _)| comm == "postgres" || comm.starts_with("postgres:"))
        .map(|(_, t)| t)
        .sum()
}

/// `(busy, total)` clock ticks of the whole machine since boot (`/proc/stat`).
pub fn machine_ticks() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(cpu) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Inodes of the sockets listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> HashSet<u64> {
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                if let Ok(i) = inode.parse() {
                    out.insert(i);
                }
            }
        }
    }
    out
}

/// The process listening on `port` on this machine, if it can be seen.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    for pid in pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let inode = target
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|i| i.parse::<u64>().ok());
            if inode.is_some_and(|i| inodes.contains(&i)) {
                return Some(pid);
            }
        }
    }
    None
}

/// This process's id.
pub fn own_pid() -> u32 {
    std::process::id()
}

/// The machine a run was made on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres_version: String,
    /// A few PostgreSQL settings that decide commit latency.
    pub postgres_settings: Vec<(String, String)>,
    /// `/proc/loadavg` (1, 5, 15 minutes) before the run.
    pub load_before: String,
    /// The same after the run.
    pub load_after: String,
    /// Whether PostgreSQL runs on this machine (its processes are visible).
    pub postgres_local: bool,
}

fn first_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|t| t.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

/// `/proc/loadavg`, first three fields.
pub fn loadavg() -> String {
    first_line(Path::new("/proc/loadavg"))
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Machine {
    /// Cores, CPU model, memory, kernel and load of this machine (PostgreSQL fields are filled
    /// by the caller, who has the connection).
    pub fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: first_line(Path::new("/proc/sys/kernel/osrelease")),
            load_before: loadavg(),
            postgres_local: postgres_ticks() > 0,
            ..Machine::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let (rss, hwm) = memory_kib(own_pid());
        assert!(rss > 0 && hwm >= rss);
        let (busy, total) = machine_ticks();
        assert!(total >= busy && total > 0);
        assert!(Machine::here().cores >= 1);
    }

    #[test]
    fn the_process_behind_a_listening_port_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port), Some(own_pid()));
    }
}
