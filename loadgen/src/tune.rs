//! The tuning profiles of `tuning/` (sysctl.d files, embedded at build time) and
//! `loadgen tune-check`: each key's live value beside the profile's, and what differs. The
//! same comparison as `tuning/check.sh`, for machines that have loadgen but not the checkout;
//! the report's machine section records the live value of every key the profiles touch.

use std::path::Path;

/// (name, file text) of each profile.
pub const PROFILES: [(&str, &str); 3] = [
    ("throughput", include_str!("../../tuning/throughput.conf")),
    ("connections", include_str!("../../tuning/connections.conf")),
    ("latency", include_str!("../../tuning/latency.conf")),
];

/// The `key = value` lines of a sysctl.d file, values with whitespace collapsed.
pub fn parse_profile(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), normalize(v)))
        .collect()
}

/// Whitespace runs (sysctl prints tabs) become one space.
pub fn normalize(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every key any profile sets, sorted, once.
pub fn profile_keys() -> Vec<String> {
    let mut keys: Vec<String> = PROFILES
        .iter()
        .flat_map(|(_, text)| parse_profile(text).into_iter().map(|(k, _)| k))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The live value of a sysctl key, `None` when the kernel has no such key.
pub fn read_sysctl(key: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::read_to_string(path).ok().map(|v| normalize(&v))
}

/// One line of the comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCheck {
    pub key: String,
    pub live: Option<String>,
    pub profile: String,
}

impl KeyCheck {
    pub fn matches(&self) -> bool {
        self.live.as_deref() == Some(self.profile.as_str())
    }
}

/// Compares `profile` (a name or a file) with `live`.
pub fn check(
    profile: &str,
    live: impl Fn(&str) -> Option<String>,
) -> Result<Vec<KeyCheck>, String> {
    let text = match PROFILES.iter().find(|(name, _)| *name == profile) {
        Some((_, text)) => (*text).to_string(),
        None => std::fs::read_to_string(Path::new(profile)).map_err(|e| {
            format!("{profile}: not a profile (throughput, connections, latency) nor a readable file: {e}")
        })?,
    };
    Ok(parse_profile(&text)
        .into_iter()
        .map(|(key, value)| KeyCheck {
            live: live(&key),
            key,
            profile: value,
        })
        .collect())
}

/// Prints the comparison; returns the number of keys that differ or are missing.
pub fn print_check(profile: &str, checks: &[KeyCheck]) -> usize {
    println!("{:<36} {:<28} {:<28}", "KEY", "LIVE", "PROFILE");
    let mut off = 0;
    for c in checks {
        let mark = match &c.live {
            None => "MISSING",
            Some(_) if c.matches() => "ok",
            Some(_) => "DIFFERS",
        };
        if mark != "ok" {
            off += 1;
        }
        println!(
            "{:<36} {:<28} {:<28} {mark}",
            c.key,
            c.live.as_deref().unwrap_or("(no such key)"),
            c.profile
        );
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
    println!();
    println!(
        "open files (this process): soft {} hard {}; relay.service asks LimitNOFILE=1048576",
        show(limit.current),
        show(limit.maximum)
    );
    println!(
        "profile {profile}: {} keys, {off} differ or are missing",
        checks.len()
    );
    off
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_and_comments_every_key() {
        for (name, text) in PROFILES {
            let keys = parse_profile(text);
            assert!(keys.len() >= 5, "{name}");
            // Each key line is preceded by a comment (directly or within its group).
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                if line.contains('=') && !line.starts_with('#') {
                    let group_start = lines[..i]
                        .iter()
                        .rposition(|l| l.trim().is_empty())
                        .map_or(0, |p| p + 1);
                    assert!(
                        lines[group_start].starts_with('#'),
                        "{name}: {line:?} has no comment above it"
                    );
                }
            }
        }
        assert!(profile_keys().contains(&"net.core.somaxconn".to_string()));
    }

    #[test]
    fn the_check_marks_what_differs() {
        let checks = check("latency", |key| match key {
            "net.core.busy_poll" => Some("50".into()),
            "vm.swappiness" => None,
            _ => Some("0".into()),
        })
        .unwrap();
        let busy = checks
            .iter()
            .find(|c| c.key == "net.core.busy_poll")
            .unwrap();
        assert!(busy.matches());
        let swap = checks.iter().find(|c| c.key == "vm.swappiness").unwrap();
        assert!(!swap.matches());
        assert!(check("no-such-profile", |_| None).is_err());
        assert_eq!(normalize("4096\t131072  6291456\n"), "4096 131072 6291456");
    }
}
