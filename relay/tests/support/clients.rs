//! The relay's clients: servers of two networks and devices, each an actor that outlives its
//! connections. A client keeps every envelope, receipt and device list it wrote until the relay
//! accepts it and writes it again, with the same id, after a refusal it may retry, a dropped
//! connection or a crash. It reads what the relay writes with `codec::FrameDecoder` (maybe
//! late, maybe in pieces), reports what it read to the ledger, and acknowledges deliveries in
//! any order on the connection they came on.

use bytes::Bytes;
use codec::{
    Ack, AckStatus, ArchivedAckStatus, DeviceAddress, DeviceId, DeviceList, Encode, ErrorCode,
    Frame, FrameDecoder, HeaderRef, MessageId, NetworkId, Receipt, ReceiptKind, UserAddress,
    delivery_flags, encode_to_bytes,
};
use relay::core::ConnId;

use super::relay::Relay;

pub const GATEKEEPER_CERT: &[u8] = b"world gatekeeper server certificate";
pub const PARTNER_CERT: &[u8] = b"world partner server certificate";
pub const GATEKEEPER: NetworkId = NetworkId(1);
pub const PARTNER: NetworkId = NetworkId(2);

/// Who a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The gatekeeper's server: sends for its network's devices and receives theirs.
    Gatekeeper,
    /// The partner's server: declares its users' device sets and carries the deliveries of
    /// its devices that have no session of their own.
    Partner,
    /// A partner device with its own session (token-authenticated).
    Device(DeviceAddress),
}

impl Who {
    fn cert(self) -> Option<&'static [u8]> {
        match self {
            Who::Gatekeeper => Some(GATEKEEPER_CERT),
            Who::Partner => Some(PARTNER_CERT),
            Who::Device(_) => None,
        }
    }

    /// Whether deliveries for `device` may come to this client.
    fn receives_for(self, device: DeviceAddress) -> bool {
        match self {
            Who::Gatekeeper => device.network == GATEKEEPER,
            Who::Partner => device.network == PARTNER,
            Who::Device(own) => own == device,
        }
    }
}

#[derive(Debug)]
pub struct ClientConn {
    pub id: ConnId,
    /// The `Hello`, until written (a slow client writes it late).
    hello: Option<Bytes>,
    decoder: FrameDecoder,
    /// Reads what the relay writes only now and then.
    pub slow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// An envelope or receipt.
    Routed,
    DeviceList,
}

/// A frame the client keeps until the relay accepts it.
#[derive(Debug)]
struct Outgoing {
    id: MessageId,
    item: Item,
    frame: Bytes,
    /// The connection its latest copy went out on, while its answer may still come.
    sent_on: Option<ConnId>,
    /// After a retryable refusal: not sent again before then (the refusal's hint).
    not_before_ms: u64,
}

#[derive(Debug)]
pub struct Client {
    pub who: Who,
    pub conns: Vec<ClientConn>,
    outbox: Vec<Outgoing>,
    /// Deliveries read and not acknowledged yet: (connection, device, id).
    to_ack: Vec<(ConnId, DeviceAddress, MessageId)>,
}

impl Client {
    pub fn new(who: Who) -> Client {
        Client {
            who,
            conns: Vec::new(),
            outbox: Vec::new(),
            to_ack: Vec::new(),
        }
    }

    /// Frames written and not yet accepted, and deliveries not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.outbox.len() + self.to_ack.len()
    }

    /// What the client still waits for, to say why a world did not settle.
    pub fn describe(&self) -> String {
        let outbox: Vec<String> = self
            .outbox
            .iter()
            .map(|o| format!("{} {:?} on {:?}", o.id, o.item, o.sent_on))
            .collect();
        format!(
            "{:?}: outbox {outbox:?}, to ack {:?}, connections {:?}",
            self.who,
            self.to_ack,
            self.conns
                .iter()
                .map(|c| (c.id, c.hello.is_none()))
                .collect::<Vec<_>>()
        )
    }

    pub fn has_unsent(&self) -> bool {
        self.outbox.iter().any(|o| o.sent_on.is_none())
    }

    /// A device list not yet accepted (the partner declares one at a time, so they apply
    /// in order).
    pub fn declaring(&self) -> bool {
        self.outbox.iter().any(|o| o.item == Item::DeviceList)
    }

    /// Opens a connection to `core`; `hello` goes out now or later.
    pub fn connect(
        &mut self,
        relay: &mut Relay,
        core: u16,
        hello: Bytes,
        hello_now: bool,
        slow: bool,
    ) {
        let id = relay.connect(core, self.who.cert());
        self.conns.push(ClientConn {
            id,
            hello: Some(hello),
            decoder: FrameDecoder::with_capacity(0),
            slow,
        });
        if hello_now {
            self.write_hellos(relay);
        }
    }

    pub fn write_hellos(&mut self, relay: &mut Relay) {
        for conn in &mut self.conns {
            if let Some(hello) = conn.hello.take() {
                relay.client_write(conn.id, &hello);
            }
        }
    }

    /// A new envelope (or receipt) to send: kept until accepted.
    pub fn queue_routed(&mut self, id: MessageId, frame: Bytes) {
        self.outbox.push(Outgoing {
            id,
            item: Item::Routed,
            frame,
            sent_on: None,
            not_before_ms: 0,
        });
    }

    /// Declares `user`'s device set.
    pub fn declare(&mut self, id: MessageId, user: UserAddress, devices: &[u32]) {
        let list = DeviceList {
            request_id: id,
            user,
            devices: devices.iter().map(|&d| DeviceId(d)).collect(),
        };
        self.outbox.push(Outgoing {
            id,
            item: Item::DeviceList,
            frame: encode(&list),
            sent_on: None,
            not_before_ms: 0,
        });
    }

    /// Writes frames not sent yet (or to be sent again), in the order they were made, at most
    /// `window` awaiting their answer per connection.
    pub fn send(&mut self, relay: &mut Relay, window: usize) {
        let ready: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|c| c.hello.is_none())
            .map(|c| c.id)
            .collect();
        if ready.is_empty() {
            return;
        }
        for index in 0..self.outbox.len() {
            let item = &self.outbox[index];
            if item.sent_on.is_some() || item.not_before_ms > relay.now_ms {
                continue;
            }
            let load = |conn: &ConnId| {
                self.outbox
                    .iter()
                    .filter(|o| o.sent_on == Some(*conn))
                    .count()
            };
            let open: Vec<ConnId> = ready.iter().filter(|c| load(c) < window).copied().collect();
            if open.is_empty() {
                return;
            }
            let conn = open[relay.rng.below(open.len() as u64) as usize];
            let item = &mut self.outbox[index];
            if relay.client_write(conn, &item.frame) {
                item.sent_on = Some(conn);
            }
        }
    }

    /// Writes a frame that is not kept (a signal), on any ready connection.
    pub fn send_once(&mut self, relay: &mut Relay, frame: &Bytes) {
        if let Some(conn) = self.conns.iter().find(|c| c.hello.is_none()) {
            relay.client_write(conn.id, frame);
        }
    }

    /// Reads up to `max` bytes from connection `index` and handles every whole frame.
    pub fn read(&mut self, relay: &mut Relay, index: usize, max: usize) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        let id = conn.id;
        let read = relay.client_read(id, max);
        conn.decoder.extend_from_slice(&read.bytes);
        let mut frames = Vec::new();
        loop {
            match conn.decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    relay
                        .ledger
                        .violated(format!("{:?} read bytes it cannot decode: {e}", self.who));
                    break;
                }
            }
        }
        for frame in frames {
            self.on_frame(relay, id, &frame);
        }
        if read.eof {
            self.lose(id);
        }
    }

    /// Reads everything waiting on every connection.
    pub fn read_all(&mut self, relay: &mut Relay) {
        for index in (0..self.conns.len()).rev() {
            self.read(relay, index, usize::MAX);
        }
    }

    /// Acknowledges up to `count` deliveries read, chosen at random (any order is allowed).
    pub fn ack(&mut self, relay: &mut Relay, count: usize) {
        for _ in 0..count {
            if self.to_ack.is_empty() {
                return;
            }
            let index = relay.rng.below(self.to_ack.len() as u64) as usize;
            let (conn, device, id) = self.to_ack.swap_remove(index);
            let ack = Ack {
                message_id: id,
                address: device,
                status: AckStatus::Accepted,
            };
            // On a connection gone since, the delivery will come again.
            relay.client_write(conn, &encode(&ack));
        }
    }

    /// The connection breaks.
    pub fn drop_conn(&mut self, relay: &mut Relay, index: usize, relay_reads_first: bool) {
        if let Some(conn) = self.conns.get(index) {
            let id = conn.id;
            relay.drop_conn(id, relay_reads_first);
            self.lose(id);
        }
    }

    /// The relay crashed: every connection is gone.
    pub fn lose_all(&mut self) {
        let ids: Vec<ConnId> = self.conns.iter().map(|c| c.id).collect();
        for id in ids {
            self.lose(id);
        }
    }

    /// Forgets a connection: what awaited an answer on it goes out again; deliveries read
    /// on it will come again.
    fn lose(&mut self, id: ConnId) {
        self.conns.retain(|c| c.id != id);
        for item in &mut self.outbox {
            if item.sent_on == Some(id) {
                item.sent_on = None;
            }
        }
        self.to_ack.retain(|(conn, _, _)| *conn != id);
    }

    fn on_frame(&mut self, relay: &mut Relay, conn: ConnId, frame: &Frame) {
        let who = self.who;
        let view = match frame.decode() {
            Ok(view) => view,
            Err(e) => {
                return relay
                    .ledger
                    .violated(format!("{who:?} got a bad frame: {e}"));
            }
        };
        match view.header {
            HeaderRef::Welcome(_) => {}
            HeaderRef::Ack(ack) => {
                let id = ack.message_id.get();
                let Some(index) = self.outbox.iter().position(|o| o.id == id) else {
                    // Another copy was answered already.
                    return;
                };
                match &ack.status {
                    ArchivedAckStatus::Accepted => {
                        if self.outbox[index].item == Item::Routed {
                            relay.ledger.confirmed(id);
                        }
                        self.outbox.remove(index);
                    }
                    ArchivedAckStatus::Rejected {
                        code,
                        retry_after_ms,
                        ..
                    } => {
                        relay.ledger.refused(code.to_native());
                        let code = ErrorCode::from_u16(code.to_native());
                        let item = &mut self.outbox[index];
                        if code.is_some_and(ErrorCode::is_retryable) {
                            if item.sent_on == Some(conn) {
                                item.sent_on = None;
                                let wait = u64::from(retry_after_ms.to_native());
                                item.not_before_ms = relay.now_ms + wait;
                            }
                        } else if item.item == Item::DeviceList {
                            relay
                                .ledger
                                .violated(format!("a device list was refused with {code:?}"));
                        } else {
                            // Refused for good (stale device list, unknown recipient, expired):
                            // the sender gives the message up.
                            self.outbox.remove(index);
                        }
                    }
                }
            }
            HeaderRef::Delivery(delivery) => {
                let device = delivery.device.get();
                if !who.receives_for(device) {
                    return relay
                        .ledger
                        .violated(format!("{who:?} got a delivery for {device}"));
                }
                let inner = match view.delivery_inner() {
                    Ok(Some(inner)) => inner,
                    _ => {
                        return relay
                            .ledger
                            .violated(format!("an empty delivery to {device}"));
                    }
                };
                let ephemeral = delivery.flags & delivery_flags::EPHEMERAL != 0;
                // The id to acknowledge, and for an envelope the user who sent it.
                let (id, from) = match inner.header {
                    HeaderRef::Signal(_) if ephemeral => return,
                    HeaderRef::Envelope(e) if !ephemeral => {
                        (e.message_id.get(), Some(e.sender.get().user_address()))
                    }
                    HeaderRef::Receipt(r) if !ephemeral => (r.receipt_id.get(), None),
                    other => {
                        return relay.ledger.violated(format!(
                            "{device} got a {:?} delivery (ephemeral: {ephemeral})",
                            other.kind()
                        ));
                    }
                };
                relay.ledger.read_by_client(conn, device, id);
                self.to_ack.push((conn, device, id));
                // Now and then a partner device says it got an envelope: a receipt back.
                if let Some(from) = from
                    && device.network == PARTNER
                    && relay.rng.chance(15)
                {
                    self.queue_receipt(relay, device, from, id);
                }
            }
            HeaderRef::Error(e) => {
                let code = e.code.to_native();
                // A client that did not say Hello in time is told so and closed.
                let expected = e.fatal && code == ErrorCode::HelloRequired.as_u16();
                if !expected {
                    relay
                        .ledger
                        .violated(format!("{who:?} got error {code}: {}", e.reason.as_str()));
                }
            }
            other => relay
                .ledger
                .violated(format!("{who:?} got an unexpected {:?}", other.kind())),
        }
    }

    fn queue_receipt(
        &mut self,
        relay: &mut Relay,
        device: DeviceAddress,
        to: UserAddress,
        of: MessageId,
    ) {
        let id = relay.ledger.next_id();
        let receipt = Receipt {
            receipt_id: id,
            kind: ReceiptKind::Delivered,
            sender: device,
            recipient: to,
            message_ids: vec![of],
            timestamp_ms: relay.now_ms,
        };
        let ttl = relay.limits.ttl_seconds_max;
        relay.ledger.sent(id, device, to, ttl);
        self.queue_routed(id, encode(&receipt));
    }
}

/// A whole frame with no payload.
pub fn encode<H: Encode>(header: &H) -> Bytes {
    encode_to_bytes(header, &[]).expect("a frame within the limits")
}
