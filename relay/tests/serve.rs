//! The `relay` binary as an operator runs it: `relay serve` as a child process (ready line,
//! `/metrics`, SIGTERM), a bad configuration file, `--help` and `relay codes`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

static DIRS: AtomicU64 = AtomicU64::new(0);

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("a7-relay-serve-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `relay serve` child; killed (by its pid, through `Child::kill`) if a test fails
/// before it exits.
struct Served {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Served {
    fn spawn(args: &[&str]) -> Served {
        let mut child = Command::new(RELAY)
            .args(args)
            .env("RELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relay serve");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Served {
            child,
            stdout,
            stderr,
        }
    }

    /// Stdout lines until the one starting `relay ready`, which it returns.
    fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.starts_with("relay ready ") => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no `relay ready` line within {READY_TIMEOUT:?}; stderr:\n{}",
                    self.stderr_so_far()
                ),
            }
        }
    }

    /// All of stderr, once the child has exited and the pipe is closed.
    fn stderr_until_closed(&self) -> String {
        let mut out = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(EXIT_TIMEOUT) {
            out.push(line);
        }
        out.join("\n")
    }

    fn stderr_so_far(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    /// Sends SIGTERM to this child (by its pid) with the system's `kill`.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit within {timeout:?}; stderr:\n{}",
                self.stderr_so_far()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lines(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The value of `key=` in the ready line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// One HTTP/1.1 GET over a raw socket; the relay closes after answering.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the HTTP port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    response
}

fn run(args: &[&str]) -> Output {
    Command::new(RELAY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run relay")
}

#[test]
fn serve_is_ready_serves_metrics_and_stops_on_sigterm() {
    let dir = TempDir::new("serve");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 temp path");
    let mut relay = Served::spawn(&[
        "serve",
        "--data-dir",
        data_arg,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--cores",
        "2",
    ]);
    let ready = relay.wait_ready();
    let tls: SocketAddr = field(&ready, "tls").parse().expect("tls=ADDR");
    let http: SocketAddr = field(&ready, "http").parse().expect("http=ADDR");
    assert_ne!(tls.port(), 0, "the ready line names the bound port");
    assert_ne!(http.port(), 0);
    assert_eq!(field(&ready, "cores"), "2");
    // The development PKI was created under the data directory.
    for file in ["ca.pem", "relay.pem", "gatekeeper.pem", "partner-token.pk8"] {
        assert!(data.join("pki").join(file).exists(), "pki/{file} missing");
    }
    // The TLS port accepts connections.
    drop(TcpStream::connect(tls).expect("connect to the TLS port"));

    let response = http_get(http, "/metrics");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "Prometheus text format: {head}"
    );
    assert!(body.contains("# TYPE relay_info gauge"), "{body}");
    let info = body
        .lines()
        .find(|l| l.starts_with("relay_info{"))
        .unwrap_or_else(|| panic!("no relay_info sample in:\n{body}"));
    assert!(info.contains("cores=\"2\""), "{info}");
    assert!(info.ends_with(" 1"), "{info}");
    // Every sample line is `name{labels} value` or `name value` with a numeric value.
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (_, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "non-numeric value: {line:?}");
    }
    let health = http_get(http, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200 "), "{health}");
    assert!(health.ends_with("ok\n"), "{health}");

    relay.terminate();
    let status = relay.wait_exit(EXIT_TIMEOUT);
    assert!(
        status.success(),
        "relay exited with {status} after SIGTERM; stderr:\n{}",
        relay.stderr_so_far()
    );
}

/// The operator's CLI against a running relay: list, add (from a certificate file and a key
/// file), a refused suspension without a ground, a suspension with one, show.
#[test]
fn partner_commands_manage_the_registry_of_a_running_relay() {
    let dir = TempDir::new("partner_cli");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 temp path");
    let mut relay = Served::spawn(&[
        "serve",
        "--data-dir",
        data_arg,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--cores",
        "1",
    ]);
    let ready = relay.wait_ready();
    assert_eq!(field(&ready, "policy"), "enforce");
    let http = field(&ready, "http");
    let common = ["--api", http, "--data-dir", data_arg];
    let partner = |args: &[&str]| {
        let mut all = vec!["partner"];
        all.extend_from_slice(args);
        all.extend_from_slice(&common);
        run(&all)
    };
    let list = partner(&["list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("\"gatekeeper\""), "{text}");

    let pki = relay::pki::DevPki {
        dir: data.join("pki"),
    };
    let (cert, _) = pki.issue_client("acme").expect("issue a certificate");
    let cert_path = dir.path().join("acme.pem");
    std::fs::write(&cert_path, cert).expect("write cert");
    let key_path = dir.path().join("acme-token.pk8");
    std::fs::write(&key_path, client::generate_network_key()).expect("write key");
    let added = partner(&[
        "add",
        "--id",
        "3",
        "--name",
        "acme",
        "--cert-file",
        cert_path.to_str().expect("utf-8"),
        "--token-key-file",
        key_path.to_str().expect("utf-8"),
        "--reason",
        "agreement signed",
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(String::from_utf8_lossy(&added.stdout).contains("\"testing\""));

    let refused = partner(&["status", "3", "--to", "suspended", "--reason", "spam"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("610 GROUND_REQUIRED"), "{stderr}");

    let suspended = partner(&[
        "status",
        "3",
        "--to",
        "suspended",
        "--reason",
        "spam",
        "--ground",
        "integrity",
    ]);
    assert!(
        suspended.status.success(),
        "{}",
        String::from_utf8_lossy(&suspended.stderr)
    );
    let shown = partner(&["show", "3"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("\"suspended\"") && text.contains("\"integrity\""),
        "{text}"
    );

    // Without the operator's certificate the registry is closed.
    let as_partner = run(&[
        "partner",
        "list",
        "--api",
        http,
        "--data-dir",
        data_arg,
        "--cert",
        data.join("pki/partner.pem").to_str().expect("utf-8"),
        "--key",
        data.join("pki/partner.key").to_str().expect("utf-8"),
    ]);
    assert!(!as_partner.status.success());
    let stderr = String::from_utf8_lossy(&as_partner.stderr);
    assert!(stderr.contains("OPERATOR_REQUIRED"), "{stderr}");

    relay.terminate();
    assert!(relay.wait_exit(EXIT_TIMEOUT).success());
}

#[test]
fn a_bad_config_key_is_named_and_fails_the_start() {
    let dir = TempDir::new("bad_config");
    for (text, key) in [
        ("no_such_key = 1\n", "no_such_key"),
        (
            "[limits]\ndevices_per_user_max = 0\n",
            "limits.devices_per_user_max",
        ),
    ] {
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write config");
        // Spawned, not run to completion: a relay that wrongly accepted the file would serve
        // forever; this way it is killed (by its pid) when the test fails.
        let mut relay = Served::spawn(&[
            "serve",
            "--config",
            path.to_str().expect("utf-8 temp path"),
            "--data-dir",
            dir.path().join("data").to_str().expect("utf-8 temp path"),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]);
        let status = relay.wait_exit(EXIT_TIMEOUT);
        let stderr = relay.stderr_until_closed();
        let stdout = relay.stdout.try_iter().collect::<Vec<_>>().join("\n");
        assert!(!status.success(), "{text:?} was accepted: {status}");
        assert!(
            stderr.contains(key),
            "the error for {text:?} does not name {key:?}: {stderr}"
        );
        assert!(
            !stdout.contains("relay ready"),
            "a bad config must not start the relay"
        );
    }
}

#[test]
fn help_lists_the_subcommands() {
    let output = run(&["--help"]);
    assert!(output.status.success(), "{}", output.status);
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["serve", "codes"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "--help does not list {command}:\n{help}"
        );
    }
}

#[test]
fn codes_lists_the_error_codes() {
    let output = run(&["codes"]);
    assert!(output.status.success(), "{}", output.status);
    let codes = String::from_utf8_lossy(&output.stdout);
    assert!(codes.contains("301  DEVICE_LIST_STALE"), "{codes}");
    let line = |code: &str| {
        codes
            .lines()
            .find(|l| l.trim_start().starts_with(code))
            .unwrap_or_else(|| panic!("no line for {code}:\n{codes}"))
            .to_string()
    };
    assert!(line("400").contains("QUEUE_FULL"));
    assert!(line("400").contains("retryable"));
    assert!(line("209").contains("SENDER_NOT_ALLOWED"));
    assert!(line("209").contains("final"));
    assert!(line("502").contains("SHUTTING_DOWN"));
}
