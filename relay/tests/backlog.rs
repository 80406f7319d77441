//! A restart with a large backlog: 1,000,000 envelopes queued for offline devices are written
//! to a shard's log on disk through the shard itself, and a fresh shard recovers every one of
//! them, in order. Prints the recovery rate and the bytes on disk per queued message.
//!
//! `A7_BACKLOG=10000000 cargo test --release -p relay --test backlog -- --nocapture` for the
//! 10-million version.
#![allow(clippy::cast_possible_truncation, clippy::print_stdout)]

use std::io::Write;
use std::time::Instant;

use codec::*;
use relay::core::ConnId;
use relay::core::log::ShardLog;
use relay::core::shard::Shard;
use relay::core::shard::interface::{Routed, ShardInput};
use relay::core::shard::recovery::SegmentStore;
use relay::io::store::ShardDir;
use relay::limits::RelayLimits;

#[test]
fn a_million_queued_messages_recover_completely() {
    let messages: u64 = std::env::var("A7_BACKLOG")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let users: u32 = 1000;
    let data_dir = std::env::temp_dir().join(format!("a7-backlog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let limits = RelayLimits {
        device_queue_depth_max: u32::MAX,
        shard_queued_bytes_max: u64::MAX,
        dedup_entries_max: 1024,
        ..RelayLimits::default()
    };
    let mut dir = ShardDir::new(&data_dir, 0);
    std::fs::create_dir_all(&dir.dir).unwrap();
    let now_ms = relay::io::now_ms();
    let mut shard: Shard = Shard::with_log(limits, ShardLog::new(1, limits.log_segment_bytes_max));
    let user = |u: u32| UserAddress::new(NetworkId(2), UserId(u128::from(u)));
    for u in 0..users {
        let devices = vec![DeviceId(1)];
        shard.handle(
            now_ms,
            ShardInput::DeviceList {
                request_id: MessageId(0),
                user: user(u),
                devices,
                reply_to: ConnId {
                    core: 0,
                    slot: 0,
                    generation: 0,
                },
            },
        );
    }
    let sender = DeviceAddress::new(NetworkId(1), UserId(1), DeviceId(1));
    let payload = [0x5A_u8; 256];
    let write = |shard: &mut Shard, dir: &ShardDir| {
        if let Some(w) = shard.take_log_write() {
            for (segment, bytes) in &w.chunks {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.segment(*segment))
                    .unwrap();
                file.write_all(bytes).unwrap();
            }
            shard.on_log_committed(w.lsn);
        }
        while shard.poll_output().is_some() {}
    };
    for n in 0..messages {
        let recipient = user((n % u64::from(users)) as u32);
        let envelope = Envelope {
            message_id: MessageId(u128::from(n)),
            sender,
            recipient,
            devices: DeviceSelection::All,
            content_type: ContentType::Text,
            e2e_protocol: E2eProtocol::Signal,
            timestamp_ms: now_ms,
            ttl_seconds: 86_400,
            flags: 0,
        };
        let frame = encode_to_bytes(&envelope, &payload).unwrap();
        let routed = Routed {
            sender,
            recipient,
            listed: None,
            id: envelope.message_id,
            ephemeral: false,
            ttl_seconds: 86_400,
            frame,
            reply_to: ConnId {
                core: 0,
                slot: 0,
                generation: 0,
            },
        };
        shard.handle(now_ms, ShardInput::Envelope(routed));
        if n % 4096 == 0 {
            write(&mut shard, &dir);
        }
    }
    write(&mut shard, &dir);
    assert_eq!(shard.stats().queued_frames, messages);
    drop(shard);

    let disk_bytes: u64 = dir
        .list()
        .unwrap()
        .iter()
        .map(|id| std::fs::metadata(dir.segment(*id)).unwrap().len())
        .sum();
    let started = Instant::now();
    let (recovered, report): (Shard, _) =
        Shard::recover(limits, limits.log_segment_bytes_max, &mut dir, now_ms).unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(report.restored_frames, messages);
    // The backlog does not have to fit in memory: past the budget it stays in the log.
    assert!(
        recovered.stats().ram_bytes <= limits.shard_ram_bytes_max,
        "{} bytes in memory",
        recovered.stats().ram_bytes
    );
    assert_eq!(recovered.stats().queued_frames, messages);
    assert!(report.torn_tails.is_empty() && report.quarantined.is_empty());
    for u in [0, users / 2, users - 1] {
        let queue = recovered.queued(&user(u).device(DeviceId(1)));
        assert_eq!(queue.len() as u64, messages / u64::from(users));
        assert!(
            queue
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1.0 < w[1].1.0),
            "order kept"
        );
    }
    println!(
        "{messages} queued messages: {} records recovered from {} segments ({disk_bytes} bytes, {:.0} bytes per queued 256-byte message) in {elapsed:.2} s = {:.0} records/s; {} MiB of frames kept in memory",
        report.records,
        report.segments,
        disk_bytes as f64 / messages as f64,
        report.records as f64 / elapsed,
        recovered.stats().ram_bytes >> 20
    );
    let _ = std::fs::remove_dir_all(&data_dir);
}
