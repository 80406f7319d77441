//! The relay's core allocates nothing per message in steady state: a counting allocator
//! watches a few thousand envelopes go through the sans-IO path — decoded from a byte stream,
//! checked by the sender's session, queued by the shard for two devices, written out as
//! `Delivery` heads and `Ack`s, and released by the devices' acks.
//!
//! The same runs on the logged path: the shard appends a record per enqueue and release, and
//! the test plays the IO shell's committer (take the write, "store" it, report it committed,
//! take the deletions) and its timer (compaction, spill, dead segments); the log is sans-IO,
//! so no disk is needed.
//!
//! What it does not cover: rustls (which allocates one buffer per outgoing TLS record, i.e.
//! per turn of a connection, not per message), the cross-core batch vectors (one per turn),
//! and spilling and reading back an offline device's backlog (every device here is online).
// A GlobalAlloc is an unsafe trait; this wrapper only counts and forwards to System.
#![allow(unsafe_code, clippy::cast_possible_truncation)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use codec::*;
use relay::core::ConnId;
use relay::core::log::{LogWrite, ShardLog};
use relay::core::session::{Session, SessionContext, SessionEvent};
use relay::core::shard::Shard;
use relay::core::shard::interface::ShardOutput;
use relay::limits::RelayLimits;
use relay::tables::auth::{Auth, NetworkEntry};
use relay::tables::policy::{PartnerStatus, Policy, UserPolicy};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const GATEKEEPER_CERT: &[u8] = b"gatekeeper test certificate";
const PARTNER_CERT: &[u8] = b"partner test certificate";
const USERS: u32 = 100;
/// Small enough that segments fill, die and are deleted during the measurement.
const SEGMENT_BYTES: u64 = 256 << 10;
const WARM_UP: u64 = 3_000;

struct Harness {
    auth: Auth,
    policy: Policy,
    limits: RelayLimits,
    shard: Shard,
    gatekeeper: Session,
    partner: Session,
    gatekeeper_out: BytesMut,
    partner_out: BytesMut,
    events: Vec<SessionEvent>,
    /// Cross-network frames the interop rules checked.
    checked: u64,
    /// Deliveries the partner's devices have to acknowledge.
    pending_acks: Vec<(MessageId, DeviceAddress)>,
    wire: BytesMut,
    decoder: FrameDecoder,
    /// The last log write, "in flight": its chunks live on while the shard appends more, as
    /// in the worker, which awaits the write while the core goes on.
    in_flight: Option<LogWrite>,
    /// Group commits, and those after which segments were deleted, on the logged path.
    commits: u64,
    deletion_batches: u64,
}

const GATEKEEPER_CONN: ConnId = ConnId {
    core: 0,
    slot: 1,
    generation: 1,
};
const PARTNER_CONN: ConnId = ConnId {
    core: 0,
    slot: 2,
    generation: 1,
};

impl Harness {
    /// `logged`: the shard records everything in a log and acknowledges what it stored.
    fn new(logged: bool) -> Harness {
        let network = |id: u32, name: &str, role: Role, cert: &[u8]| NetworkEntry {
            id: NetworkId(id),
            name: name.into(),
            server_roles: vec![role],
            cert_sha256: vec![relay::pki::sha256(cert)],
            token_public_key: None,
            client_ca_der: Vec::new(),
        };
        let auth = Auth::new(
            vec![
                network(1, "gatekeeper", Role::GatekeeperServer, GATEKEEPER_CERT),
                network(2, "partner", Role::PartnerServer, PARTNER_CERT),
            ],
            16,
        )
        .unwrap();
        // A dedup table that fills during warm-up and then only evicts.
        let limits = RelayLimits {
            dedup_entries_max: 1024,
            ..RelayLimits::default()
        };
        // The interop rules enforced, every user enlisted: the policy check is on the path
        // measured.
        let policy = Policy::new(true);
        policy.set_network(NetworkId(1), PartnerStatus::Active);
        policy.set_network(NetworkId(2), PartnerStatus::Active);
        let enlisted = UserPolicy::reachable_by_everyone;
        for u in 0..7u32 {
            policy.set_user(
                UserAddress::new(NetworkId(1), UserId(u128::from(u))),
                enlisted(),
            );
        }
        for u in 0..USERS {
            policy.set_user(
                UserAddress::new(NetworkId(2), UserId(u128::from(u))),
                enlisted(),
            );
        }
        Harness {
            auth,
            policy,
            limits,
            shard: if logged {
                Shard::with_log(limits, ShardLog::new(1, SEGMENT_BYTES))
            } else {
                Shard::new(limits)
            },
            gatekeeper: Session::new(GATEKEEPER_CONN, 1, 0),
            partner: Session::new(PARTNER_CONN, 2, 0),
            gatekeeper_out: BytesMut::with_capacity(1 << 20),
            partner_out: BytesMut::with_capacity(1 << 20),
            events: Vec::with_capacity(64),
            checked: 0,
            pending_acks: Vec::with_capacity(64),
            wire: BytesMut::with_capacity(1 << 16),
            decoder: FrameDecoder::with_capacity(1 << 16),
            in_flight: None,
            commits: 0,
            deletion_batches: 0,
        }
    }

    /// The IO shell's committer: take what was appended, "write and sync" it, report it
    /// committed, delete dead segments.
    fn commit(&mut self) {
        let Some(write) = self.shard.take_log_write() else {
            return;
        };
        self.shard.on_log_committed(write.lsn);
        self.in_flight = Some(write);
        self.commits += 1;
        let deleted = self.shard.take_log_deletions();
        self.deletion_batches += u64::from(!deleted.is_empty());
    }

    /// Feeds one encoded frame from a client through its session, the shard, and back out.
    fn feed_from_client(&mut self, now_ms: u64, partner: bool) {
        self.decoder.extend_from_slice(&self.wire);
        self.wire.clear();
        while let Some(frame) = self.decoder.next_frame().unwrap() {
            let (session, out, cert) = if partner {
                (&mut self.partner, &mut self.partner_out, PARTNER_CERT)
            } else {
                (
                    &mut self.gatekeeper,
                    &mut self.gatekeeper_out,
                    GATEKEEPER_CERT,
                )
            };
            let cx = SessionContext {
                now_ms,
                auth: &self.auth,
                policy: &self.policy,
                peer_cert: Some(cert),
                limits: &self.limits,
                shards: 1,
            };
            session.handle_frame(&cx, &frame);
            session.poll_transmit(out);
            while let Some(event) = session.poll_event() {
                self.events.push(event);
            }
        }
        for event in self.events.drain(..) {
            match event {
                SessionEvent::Route { input, .. } | SessionEvent::Broadcast(input) => {
                    self.shard.handle(now_ms, input)
                }
                SessionEvent::PolicyChecked { refused } => {
                    self.checked += 1;
                    assert!(!refused, "the rules refused a frame");
                }
                SessionEvent::Contact(contact) => self.policy.record_contact(contact),
                SessionEvent::Refused(code) => panic!("refused: {code}"),
                SessionEvent::Close => panic!("session closed"),
                SessionEvent::DeadlinePassed(deadline) => panic!("deadline passed: {deadline:?}"),
                SessionEvent::KeepAliveSent => panic!("asked for a KeepAlive"),
            }
        }
        self.drain_shard();
    }

    /// Commits what the shard logged (its acks wait for that) and carries out its outputs.
    fn drain_shard(&mut self) {
        self.commit();
        while let Some(output) = self.shard.poll_output() {
            match output {
                ShardOutput::Deliver {
                    device, seq, frame, ..
                } => {
                    assert_eq!(device.network, NetworkId(2));
                    encode_head(
                        &mut self.partner_out,
                        &Delivery {
                            device,
                            seq,
                            flags: 0,
                        },
                        frame.len(),
                    )
                    .unwrap();
                    let HeaderRef::Envelope(e) = decode(&frame).unwrap().header else {
                        panic!("not an envelope")
                    };
                    self.pending_acks.push((e.message_id.get(), device));
                }
                ShardOutput::Ack {
                    conn,
                    of,
                    id,
                    address,
                    result,
                } => {
                    assert!(result.is_ok(), "{result:?}");
                    let (session, out) = if conn == GATEKEEPER_CONN {
                        (&mut self.gatekeeper, &mut self.gatekeeper_out)
                    } else {
                        (&mut self.partner, &mut self.partner_out)
                    };
                    session.handle_relay_ack(of, id, address, result);
                    session.poll_transmit(out);
                }
                ShardOutput::Load { .. } => panic!("a load, with nothing spilled"),
                ShardOutput::Close { code, .. } => panic!("closed with {code}"),
                ShardOutput::Send { .. } => panic!("a notice nobody asked for"),
                ShardOutput::Applied { .. } => panic!("no control change was asked"),
            }
        }
    }

    fn hello(&mut self, role: Role, partner: bool) {
        let hello = Hello {
            version_min: 1,
            version_max: 1,
            role,
            features: 0,
            agent: String::new(),
            token: None,
        };
        encode(&mut self.wire, &hello, &[]).unwrap();
        self.feed_from_client(0, partner);
    }

    /// One envelope from a gatekeeper user to a partner user (two devices), delivered and
    /// acknowledged by both devices.
    fn round(&mut self, n: u64, payload: &[u8]) {
        let now_ms = 1_800_000_000_000 + n;
        let envelope = Envelope {
            message_id: MessageId(u128::from(n)),
            sender: DeviceAddress::new(NetworkId(1), UserId(u128::from(n % 7)), DeviceId(1)),
            recipient: UserAddress::new(NetworkId(2), UserId(u128::from(n as u32 % USERS))),
            devices: DeviceSelection::All,
            content_type: ContentType::Text,
            e2e_protocol: E2eProtocol::Signal,
            timestamp_ms: now_ms,
            ttl_seconds: 3600,
            flags: 0,
        };
        encode(&mut self.wire, &envelope, payload).unwrap();
        self.feed_from_client(now_ms, false);
        while let Some((id, device)) = self.pending_acks.pop() {
            encode(
                &mut self.wire,
                &Ack {
                    message_id: id,
                    address: device,
                    status: AckStatus::Accepted,
                },
                &[],
            )
            .unwrap();
        }
        self.feed_from_client(now_ms, true);
        // The timer: TTLs, dedup window, and the log's compaction, spill and dead segments.
        if n.is_multiple_of(16) {
            self.shard.handle_timeout(now_ms);
            self.drain_shard();
        }
        self.gatekeeper_out.clear();
        self.partner_out.clear();
    }
}

/// Device lists, then enough rounds to fill the dedup table and every buffer.
fn warm_up(h: &mut Harness) {
    h.hello(Role::GatekeeperServer, false);
    h.hello(Role::PartnerServer, true);
    for u in 0..USERS {
        let list = DeviceList {
            request_id: MessageId(u128::from(u) + (1 << 100)),
            user: UserAddress::new(NetworkId(2), UserId(u128::from(u))),
            devices: vec![DeviceId(1), DeviceId(2)],
        };
        encode(&mut h.wire, &list, &[]).unwrap();
        h.feed_from_client(0, true);
    }
    let payload = [0x5A; 256];
    for n in 1..=WARM_UP {
        h.round(n, &payload);
    }
}

/// The allocations of `measured` rounds after the warm-up.
fn count_allocations(h: &mut Harness, measured: u64) -> u64 {
    let payload = [0x5A; 256];
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    for n in WARM_UP + 1..=WARM_UP + measured {
        h.round(n, &payload);
    }
    COUNTING.with(|c| c.set(false));
    let allocations = ALLOCATIONS.with(Cell::get);
    let stats = h.shard.stats();
    assert_eq!(stats.queued_frames, 0, "every delivery was acknowledged");
    assert!(stats.released >= 2 * measured);
    assert!(h.checked >= 2 * measured);
    allocations
}

#[test]
fn routing_envelopes_allocates_nothing_per_message() {
    let mut h = Harness::new(false);
    warm_up(&mut h);
    let measured = 3_000;
    let allocations = count_allocations(&mut h, measured);
    // The devices acknowledge each round, so the decoder's read block is free again when the
    // next frames arrive and is reused; under a backlog a new block is taken per block of
    // frames still queued (not per message).
    println!("{allocations} allocations for {measured} envelopes routed to 2 devices each");
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for {measured} envelopes"
    );
}

#[test]
fn the_logged_path_allocates_nothing_per_message() {
    let mut h = Harness::new(true);
    warm_up(&mut h);
    let measured = 3_000;
    let log = h.shard.log().unwrap();
    let (segment, commits, batches) = (log.current(), h.commits, h.deletion_batches);
    let allocations = count_allocations(&mut h, measured);
    let opened = h.shard.log().unwrap().current() - segment;
    let commits = h.commits - commits;
    let batches = h.deletion_batches - batches;
    println!(
        "{allocations} allocations for {measured} envelopes routed to 2 devices each, logged: {commits} commits, {opened} segments opened, {batches} batches of deletions"
    );
    // Segments filled and were deleted while measured (each compacted first: its device sets
    // rewritten to the head).
    assert!(commits >= 2 * measured && opened >= 3 && batches >= 3);
    // Per message (record, write buffer, commit) nothing. Per segment, two: its set of older
    // segments it refers to gets its first node (`SegmentStats::refs`), and the list of
    // segments to delete handed to the IO shell is a new Vec. A segment is 64 MiB by default.
    assert_eq!(
        allocations,
        opened + batches,
        "{allocations} allocations for {measured} envelopes, {opened} segments opened, {batches} batches of deletions"
    );
}
