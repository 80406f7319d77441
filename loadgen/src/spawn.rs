//! `--spawn`: start a relay process on free loopback ports, wait for its `relay ready` line,
//! and stop it with SIGTERM at the end. Also reads a process's resident memory from
//! `/proc/<pid>/status`, for the connection-scale figures.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long a relay may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a relay may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The facts of a relay's ready line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ready {
    pub tls: SocketAddr,
    pub http: SocketAddr,
    pub cores: u16,
    pub durability: String,
    pub data: String,
    /// Whether it enforces the interop rules (`enforce`, `off`); empty from a relay that
    /// does not say.
    pub policy: String,
}

/// Parses `relay ready tls=ADDR http=ADDR cores=N durability=... data=... policy=...`.
pub fn parse_ready_line(line: &str) -> Option<Ready> {
    let rest = line.trim().strip_prefix("relay ready")?;
    let mut tls = None;
    let mut http = None;
    let mut cores = None;
    let mut durability = String::new();
    let mut data = String::new();
    let mut policy = String::new();
    for field in rest.split_whitespace() {
        let (key, value) = field.split_once('=')?;
        match key {
            "tls" => tls = value.parse().ok(),
            "http" => http = value.parse().ok(),
            "cores" => cores = value.parse().ok(),
            "durability" => durability = value.to_string(),
            "data" => data = value.to_string(),
            "policy" => policy = value.to_string(),
            _ => {}
        }
    }
    Some(Ready {
        tls: tls?,
        http: http?,
        cores: cores?,
        durability,
        data,
        policy,
    })
}

/// The relay binary: `explicit`, or `relay` next to this executable (or one directory up,
/// for test binaries in `target/<profile>/deps`).
pub fn find_relay_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("--relay-bin {}: no such file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join("relay");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err(format!(
        "no relay binary next to {} (build it with `cargo build -p relay`, same profile, or pass --relay-bin)",
        exe.display()
    ))
}

/// A relay this process started.
#[derive(Debug)]
pub struct SpawnedRelay {
    child: Child,
    pub ready: Ready,
    pub log: PathBuf,
}

impl SpawnedRelay {
    /// Starts `bin serve` with the given config (or its embedded defaults), data directory,
    /// core count, durability and interop policy (`enforce`, `off`; default: the config's,
    /// which enforces), on 127.0.0.1 port 0 for TLS and HTTP. Its stderr goes to `log`.
    pub fn start(
        bin: &Path,
        config: Option<&Path>,
        data_dir: &Path,
        cores: Option<u16>,
        durability: Option<&str>,
        policy: Option<&str>,
        log: &Path,
    ) -> Result<SpawnedRelay, String> {
        let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        if let Some(cores) = cores {
            command.args(["--cores", &cores.to_string()]);
        }
        if let Some(level) = durability {
            command.args(["--durability", level]);
        }
        if let Some(mode) = policy {
            command.args(["--policy", mode]);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            return Err("relay stdout not captured".into());
        };
        let (lines_tx, lines_rx) = mpsc::channel();
        // Reads the relay's stdout for the whole of its life, so it never blocks on a full
        // pipe; only the ready line matters.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    // Nobody listens any more: keep draining.
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    if let Some(ready) = parse_ready_line(&line) {
                        return Ok(SpawnedRelay {
                            child,
                            ready,
                            log: log.to_path_buf(),
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    return Err(format!(
                        "the relay exited before it was ready ({status:?}); its log:\n{}",
                        tail(log)
                    ));
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the relay exited before it was ready ({status}); its log:\n{}",
                    tail(log)
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the relay printed no ready line within {READY_TIMEOUT:?}; its log:\n{}",
                    tail(log)
                ));
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid())
    }

    /// SIGTERM, then waits; kills it if it does not exit in time. Returns how it ended.
    pub fn stop(mut self) -> String {
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return format!("wait failed: {e}"),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("killed after {STOP_TIMEOUT:?} without exiting on SIGTERM")
    }
}

/// The last lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `VmRSS` of a process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&status, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_parses() {
        let ready = parse_ready_line(
            "relay ready tls=127.0.0.1:40123 http=127.0.0.1:40124 cores=2 durability=memory data=/tmp/x policy=enforce location=eea/120d",
        )
        .unwrap();
        assert_eq!(ready.tls.port(), 40123);
        assert_eq!(ready.http.port(), 40124);
        assert_eq!(ready.cores, 2);
        assert_eq!(ready.durability, "memory");
        assert_eq!(ready.data, "/tmp/x");
        assert_eq!(ready.policy, "enforce");
        assert_eq!(parse_ready_line("relay starting"), None);
        assert_eq!(
            parse_ready_line("relay ready tls=nonsense http=127.0.0.1:1 cores=1"),
            None
        );
    }

    #[test]
    fn rss_reads_from_proc() {
        assert!(parse_status_kib("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS:") == Some(1234));
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
