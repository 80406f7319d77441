//! The machine a run happened on, for the report: cores, memory, kernel, the file-descriptor
//! limit, and the live value of every sysctl key the tuning profiles (`tuning/*.conf`) set.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::tune;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub memory_total_kib: Option<u64>,
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    /// Key → live value (`null`: the kernel has no such key).
    pub sysctl: BTreeMap<String, Option<String>>,
}

impl Machine {
    pub fn probe() -> Machine {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let memory_total_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| crate::spawn::parse_status_kib(&m, "MemTotal:"));
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let sysctl = tune::profile_keys()
            .into_iter()
            .map(|key| {
                let value = tune::read_sysctl(&key);
                (key, value)
            })
            .collect();
        Machine {
            cores,
            kernel,
            memory_total_kib,
            nofile_soft: limit.current,
            nofile_hard: limit.maximum,
            sysctl,
        }
    }
}

/// Raises the open-file limit to `wanted` (or as far as allowed); returns the new soft limit.
pub fn raise_nofile(wanted: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return current;
    }
    // Root may raise the hard limit too (up to fs.nr_open).
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = wanted.min(nr_open);
    for maximum in [Some(target.max(limit.maximum.unwrap_or(0))), limit.maximum] {
        let want = Rlimit {
            current: Some(target.min(maximum.unwrap_or(u64::MAX))),
            maximum,
        };
        if setrlimit(Resource::Nofile, want).is_ok() {
            break;
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(current)
}
