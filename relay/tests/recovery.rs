//! Recovery of a damaged log, with the real binary: a segment damaged in the middle is
//! quarantined, what can be proven intact in it is stored again before the relay says it is
//! ready, and a clean stop or a SIGKILL right after that start loses none of it. Every frame
//! the relay acknowledged, outside the damaged record, reaches its device in the end.
//!
//! The first test is the finding of issue 11 item 3, byte for byte: a device set, three
//! enqueues, a record with a bad CRC and a valid record after it.
#![allow(clippy::cast_possible_truncation, clippy::print_stdout)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use client::{ClientTls, ConnectOptions, Event, Inbound, connect, mint_device_token};
use codec::*;
use relay::core::DeviceSet;
use relay::core::wal::{self, Record, Target, Targets};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");
const READY_TIMEOUT: Duration = Duration::from_secs(30);

static DIRS: AtomicU64 = AtomicU64::new(0);

/// A temporary data directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("a7-recovery-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `relay serve` child on one core at the fsync level, killed on drop.
struct Served {
    child: Child,
    tls: SocketAddr,
    http: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Served {
    fn start(data_dir: &Path) -> Served {
        let mut child = Command::new(RELAY)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(["--cores", "1", "--durability", "fsync", "--policy", "off"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relay serve");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let deadline = Instant::now() + READY_TIMEOUT;
        let ready = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stdout.recv_timeout(left) {
                Ok(line) if line.starts_with("relay ready ") => break line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no ready line; stderr:\n{}",
                    stderr.try_iter().collect::<Vec<_>>().join("\n")
                ),
            }
        };
        Served {
            child,
            tls: field(&ready, "tls").parse().unwrap(),
            http: field(&ready, "http").parse().unwrap(),
            stderr,
        }
    }

    /// A gauge or counter of core 0 from `/metrics`.
    fn metric(&self, name: &str) -> u64 {
        let body = http_get(self.http, "/metrics");
        let prefix = format!("{name}{{core=\"0\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
            .trim()
            .parse()
            .unwrap()
    }

    /// SIGTERM, and waits for the exit; returns stderr.
    fn stop(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "relay exited with {status}");
        self.stderr_until_closed()
    }

    /// SIGKILL, at once; returns stderr.
    fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.stderr_until_closed()
    }

    fn stderr_until_closed(&self) -> String {
        let mut out = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(10)) {
            out.push(line);
        }
        out.join("\n")
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

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn tls(pki: &Path, who: Option<&str>) -> ClientTls {
    let ca = pki.join("ca.pem");
    let pair = who.map(|name| {
        (
            pki.join(format!("{name}.pem")),
            pki.join(format!("{name}.key")),
        )
    });
    ClientTls::from_pem_files(&ca, pair.as_ref().map(|(c, k)| (c.as_path(), k.as_path()))).unwrap()
}

fn partner_user(u: u32) -> UserAddress {
    UserAddress::new(NetworkId(2), UserId(0x2000 + u128::from(u)))
}

fn sender() -> DeviceAddress {
    DeviceAddress::new(NetworkId(1), UserId(0x1000), DeviceId(1))
}

fn envelope(id: MessageId, to: UserAddress) -> Envelope {
    Envelope {
        message_id: id,
        sender: sender(),
        recipient: to,
        devices: DeviceSelection::All,
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: relay::io::now_ms(),
        ttl_seconds: 3600,
        flags: 0,
    }
}

/// Connects `device` with a token of its network and returns the ids of what is delivered
/// to it within `wait` (acknowledging each), in order.
fn receive(addr: SocketAddr, pki: &Path, device: DeviceAddress, wait: Duration) -> Vec<MessageId> {
    static TOKENS: AtomicU64 = AtomicU64::new(1);
    let key = std::fs::read(pki.join("partner-token.pk8")).unwrap();
    let token_id =
        u128::from(TOKENS.fetch_add(1, Ordering::Relaxed)) + (u128::from(std::process::id()) << 64);
    let token = mint_device_token(&key, device, relay::io::now_ms() + 600_000, token_id).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let conn = connect(ConnectOptions::new(addr, tls(pki, None), Role::Device).token(token))
            .await
            .unwrap();
        let (mut send, mut recv) = conn.into_split();
        let mut ids = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, recv.next_event()).await {
            if let Event::Delivery {
                device: to,
                inner: Inbound::Envelope { header, .. },
                ..
            } = event
            {
                ids.push(header.message_id);
                send.ack_now(header.message_id, to).await.unwrap();
            }
        }
        ids
    })
}

/// The finding's segment: a device set, three enqueues, one whose CRC is wrong, one valid.
fn write_finding_segment(data_dir: &Path) -> Vec<MessageId> {
    std::fs::create_dir_all(data_dir.join("shard-0")).unwrap();
    std::fs::write(data_dir.join("shards"), "1\n").unwrap();
    let user = partner_user(0);
    let mut devices = DeviceSet::new();
    devices.insert(DeviceId(1));
    let mut out = BytesMut::new();
    wal::encode(&mut out, &Record::DeviceSet { user, devices });
    let now = relay::io::now_ms();
    let mut damaged_at = 0;
    let mut ids = Vec::new();
    // Queue positions start at 1.
    for seq in 1..=5u64 {
        let id = MessageId(0xF1D0 + u128::from(seq));
        let frame = encode_to_bytes(&envelope(id, user), &seq.to_le_bytes()).unwrap();
        if seq == 4 {
            damaged_at = out.len();
        } else {
            ids.push(id);
        }
        wal::encode(
            &mut out,
            &Record::Enqueue {
                arrival_ms: now,
                expires_at_ms: now + 3_600_000,
                sender: sender(),
                id,
                recipient: user,
                targets: Targets::one(Target {
                    device: DeviceId(1),
                    seq,
                }),
                frame: &frame,
            },
        );
    }
    // The CRC of the fourth enqueue is wrong.
    out[damaged_at + 4] ^= 0x5A;
    std::fs::write(
        data_dir.join("shard-0").join(format!("{:020}.log", 1)),
        &out,
    )
    .unwrap();
    ids
}

/// Issue 11, item 3: the first start rescued the frames and quarantined the segment, but the
/// rescued records were never written; the second start found nothing. Now both starts (after
/// a clean stop, and after a SIGKILL right after `ready`) find every intact frame, and the
/// device receives them.
#[test]
fn a_damaged_segment_keeps_its_frames_across_restarts() {
    let dir = TempDir::new("finding");
    let intact = write_finding_segment(&dir.0);
    // The dev PKI is created on the first start, inside the data directory. Frames found by
    // each start: the first, after a clean stop, after a SIGKILL.
    let relay = Served::start(&dir.0);
    let first = relay.metric("relay_recovered_frames");
    let log = relay.stop();
    let relay = Served::start(&dir.0);
    let second = relay.metric("relay_recovered_frames");
    relay.kill();
    let relay = Served::start(&dir.0);
    let third = relay.metric("relay_recovered_frames");
    let n = intact.len() as u64;
    assert_eq!(
        [first, second, third],
        [n, n, n],
        "first start's log:\n{log}"
    );
    assert!(
        dir.0
            .join("shard-0/quarantine")
            .join(format!("{:020}.log", 1))
            .exists(),
        "the damaged segment is kept for inspection"
    );
    assert_eq!(relay.metric("relay_log_quarantined_segments"), 1);
    let got = receive(
        relay.tls,
        &dir.0.join("pki"),
        partner_user(0).device(DeviceId(1)),
        Duration::from_secs(3),
    );
    assert_eq!(got, intact);
    relay.stop();
}

/// The same finding, but the relay is killed at once on the first start (before any other
/// write could carry the rescued records to disk by chance).
#[test]
fn a_sigkill_right_after_the_first_start_loses_nothing() {
    let dir = TempDir::new("kill-first");
    let intact = write_finding_segment(&dir.0);
    let relay = Served::start(&dir.0);
    relay.kill();
    let relay = Served::start(&dir.0);
    assert_eq!(relay.metric("relay_recovered_frames"), intact.len() as u64);
    relay.stop();
}

/// Frames the relay acknowledged over TLS, a record damaged in the middle of the segment,
/// then start, clean stop, start, SIGKILL, start: every acknowledged frame but the damaged
/// record's reaches each device of its recipient, in order.
#[test]
fn every_acknowledged_frame_outside_the_damage_is_delivered() {
    const USERS: u32 = 3;
    const SENT: u64 = 30;
    let dir = TempDir::new("acked");
    let pki = dir.0.join("pki");
    let relay = Served::start(&dir.0);
    let addr = relay.tls;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let acked: BTreeSet<MessageId> = runtime.block_on(async {
        let mut partner = connect(ConnectOptions::new(
            addr,
            tls(&pki, Some("partner")),
            Role::PartnerServer,
        ))
        .await
        .unwrap();
        for u in 0..USERS {
            partner
                .send_device_list(&DeviceList {
                    request_id: MessageId(u128::from(u) + 1),
                    user: partner_user(u),
                    devices: vec![DeviceId(1), DeviceId(2)],
                })
                .await
                .unwrap();
        }
        partner.flush().await.unwrap();
        for _ in 0..USERS {
            assert!(matches!(
                partner.next_event().await.unwrap(),
                Event::Ack(Ack {
                    status: AckStatus::Accepted,
                    ..
                })
            ));
        }
        let mut gatekeeper = connect(ConnectOptions::new(
            addr,
            tls(&pki, Some("gatekeeper")),
            Role::GatekeeperServer,
        ))
        .await
        .unwrap();
        for n in 0..SENT {
            let id = MessageId(0xAC00 + u128::from(n));
            let to = partner_user((n % u64::from(USERS)) as u32);
            gatekeeper
                .send_envelope(&envelope(id, to), &n.to_le_bytes())
                .await
                .unwrap();
        }
        gatekeeper.flush().await.unwrap();
        let mut acked = BTreeSet::new();
        while acked.len() < SENT as usize {
            if let Event::Ack(Ack {
                message_id,
                status: AckStatus::Accepted,
                ..
            }) = gatekeeper.next_event().await.unwrap()
            {
                acked.insert(message_id);
            }
        }
        acked
    });
    relay.stop();
    // Damage the body of the enqueue record of the 15th message, in the middle of its segment.
    let damaged_id = MessageId(0xAC00 + 14);
    let segment = only_segment(&dir.0.join("shard-0"));
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = {
        let mut scanner = wal::Scanner::new(&bytes);
        let mut at = None;
        while let Ok(Some((offset, record))) = scanner.next() {
            if matches!(record, Record::Enqueue { id, .. } if id == damaged_id) {
                at = Some(offset);
            }
        }
        at.expect("the record of the damaged message")
    };
    assert!(at > 0 && at + 200 < bytes.len(), "in the middle");
    bytes[at + wal::RECORD_HEADER_BYTES + 60] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();

    let expected_frames = (SENT - 1) * 2;
    let relay = Served::start(&dir.0);
    assert_eq!(relay.metric("relay_recovered_frames"), expected_frames);
    let log = relay.stop();
    assert!(
        log.contains("bad CRC at offset") && log.contains("quarantine"),
        "the damage is logged:\n{log}"
    );
    let relay = Served::start(&dir.0);
    assert_eq!(
        relay.metric("relay_recovered_frames"),
        expected_frames,
        "after a clean stop"
    );
    relay.kill();
    let relay = Served::start(&dir.0);
    assert_eq!(
        relay.metric("relay_recovered_frames"),
        expected_frames,
        "after SIGKILL"
    );
    for u in 0..USERS {
        let expected: Vec<MessageId> = (0..SENT)
            .filter(|n| n % u64::from(USERS) == u64::from(u))
            .map(|n| MessageId(0xAC00 + u128::from(n)))
            .filter(|id| *id != damaged_id && acked.contains(id))
            .collect();
        for d in [1, 2] {
            let device = partner_user(u).device(DeviceId(d));
            let got = receive(relay.tls, &pki, device, Duration::from_secs(2));
            assert_eq!(got, expected, "{device}");
        }
    }
    relay.stop();
}

/// The one segment of a shard directory.
fn only_segment(shard_dir: &Path) -> PathBuf {
    let segments: Vec<PathBuf> = std::fs::read_dir(shard_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    segments.into_iter().next().unwrap()
}

fn inspect(args: &[&str], path: &Path) -> (bool, String) {
    let out = Command::new(RELAY)
        .args(["log", "inspect"])
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap();
    (out.status.success(), text)
}

/// `relay log inspect` on a segment file, on a data directory with a quarantined segment and
/// the one recovery wrote, and `--summary`.
#[test]
fn log_inspect_shows_each_record_and_the_damage() {
    let dir = TempDir::new("inspect");
    let intact = write_finding_segment(&dir.0);
    let segment = dir.0.join("shard-0").join(format!("{:020}.log", 1));
    let (ok, text) = inspect(&[], &segment);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let device_set = lines.iter().find(|l| l.contains("device_set")).unwrap();
    assert!(
        device_set.contains(" ok ") && device_set.contains("user n2/"),
        "{text}"
    );
    for id in &intact {
        let line = lines
            .iter()
            .find(|l| l.contains(&id.to_string()))
            .unwrap_or_else(|| panic!("no line for {id}:\n{text}"));
        assert!(line.contains("enqueue") && line.contains(" ok "), "{line}");
        assert!(line.contains("devices#seq [d1#"), "{line}");
    }
    let damaged = lines.iter().find(|l| l.contains("DAMAGED")).unwrap();
    assert!(
        damaged.contains("enqueue") && damaged.contains(" bad ") && damaged.contains("bad CRC"),
        "{damaged}"
    );
    assert!(damaged.contains("read on from"), "{damaged}");
    assert!(
        text.contains("5 records (4 enqueue, 0 release, 1 device set), 1 damaged ranges"),
        "{text}"
    );

    // After a start: the damaged segment in quarantine/, the rescued records in segment 2.
    Served::start(&dir.0).stop();
    let (ok, text) = inspect(&[], &dir.0);
    assert!(ok, "{text}");
    assert!(
        text.contains("00000000000000000001.log (quarantined)"),
        "{text}"
    );
    assert!(text.contains("00000000000000000002.log\n"), "{text}");
    assert!(text.contains("2 segments, "), "{text}");
    let (ok, summary) = inspect(&["--summary"], &dir.0);
    // Damage is shown even in a summary; intact records are not.
    assert!(
        ok && !summary.lines().any(|l| l.contains(" ok ")),
        "{summary}"
    );
    assert!(
        summary.contains("DAMAGED: bad CRC") && summary.contains("1 damaged ranges"),
        "{summary}"
    );

    let (ok, text) = inspect(&[], &dir.0.join("nothing-here"));
    assert!(!ok && text.contains("nothing-here"), "{text}");
}
