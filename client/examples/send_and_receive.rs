//! One message from the gatekeeper to a partner user and its delivery receipt back, through a
//! relay started with its embedded defaults.
//!
//! ```text
//! cargo run -p client --example send_and_receive -- [--data-dir ./relay-data] [--addr 127.0.0.1:7700] [--api 127.0.0.1:7780]
//! ```
//!
//! First, each network enlists its user through the control API (`--api`, with the same
//! certificates): a consent record signed with the network's key, the user's devices and a
//! location attestation inside the EEA. Without it the relay refuses cross-network traffic
//! (`SENDER_NOT_ENLISTED`, `RECIPIENT_NOT_ENLISTED`).
//!
//! Connects twice: as the gatekeeper's server (network 1, `gatekeeper.pem`) and as the demo
//! partner's server (network 2, `partner.pem`), both from the relay's dev PKI in
//! `<data-dir>/pki/`. Each server first declares its user's device set (device 1) with a
//! `DeviceList`, so the relay knows where to deliver. The gatekeeper then sends an envelope from user (1, 0x1001) device 1 to user
//! (2, 0x2002), all devices, and waits for the relay's `Ack`; the partner receives the
//! `Delivery`, acks it and answers with a `Delivered` receipt; the gatekeeper receives that
//! receipt and acks it in turn.

use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use client::control::{ControlClient, sign_consent, user_hex};
use client::{
    AckStatus, ClientError, ClientTls, ConnectOptions, Connection, ContentType, DeviceId,
    DeviceList, DeviceSelection, E2eProtocol, Envelope, ErrorCode, Event, Inbound, MessageId,
    NetworkId, Receipt, ReceiptKind, Role, UserAddress, UserId, connect,
};
use devkit::now_ms;

/// How long to wait for each answer from the relay.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    data_dir: PathBuf,
    addr: SocketAddr,
    api: SocketAddr,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        data_dir: PathBuf::from("./relay-data"),
        addr: SocketAddr::from(([127, 0, 0, 1], 7700)),
        api: SocketAddr::from(([127, 0, 0, 1], 7780)),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--data-dir" => args.data_dir = PathBuf::from(value()?),
            "--addr" => {
                let text = value()?;
                args.addr = text.parse().map_err(|e| format!("--addr {text:?}: {e}"))?;
            }
            "--api" => {
                let text = value()?;
                args.api = text.parse().map_err(|e| format!("--api {text:?}: {e}"))?;
            }
            "-h" | "--help" => {
                println!(
                    "usage: send_and_receive [--data-dir ./relay-data] [--addr 127.0.0.1:7700] [--api 127.0.0.1:7780]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

/// A random 128-bit message id.
fn random_id() -> Result<MessageId, Box<dyn Error>> {
    let bytes: [u8; 16] = ring::rand::generate(&ring::rand::SystemRandom::new())
        .map_err(|_| "the system random number generator failed")?
        .expose();
    Ok(MessageId(u128::from_le_bytes(bytes)))
}

async fn connect_as(
    args: &Args,
    role: Role,
    cert: &str,
    key: &str,
) -> Result<Connection, ClientError> {
    let pki = args.data_dir.join("pki");
    let (ca, cert, key) = (pki.join("ca.pem"), pki.join(cert), pki.join(key));
    let tls = ClientTls::from_pem_files(&ca, Some((cert.as_path(), key.as_path())))?;
    let options = ConnectOptions::new(args.addr, tls, role)
        .server_name("localhost")
        .agent("send-and-receive-example/1");
    let connection = connect(options).await?;
    let welcome = connection.welcome();
    println!(
        "{role:?}: session {} (protocol v{}, up to {} payload bytes, {} frames in flight)",
        welcome.session_id,
        welcome.version,
        welcome.limits.payload_bytes_max,
        welcome.limits.frames_in_flight_max
    );
    Ok(connection)
}

/// Reads events until `pick` accepts one; prints and skips the others.
async fn wait_for<T>(
    connection: &mut Connection,
    who: &str,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> Result<T, Box<dyn Error>> {
    let waiting = async {
        loop {
            let event = connection.next_event().await?;
            if let Some(found) = pick(&event) {
                return Ok(found);
            }
            match event {
                Event::Closed => return Err(format!("{who}: the relay closed the session").into()),
                Event::Error(error) if error.fatal => {
                    return Err(format!("{who}: fatal error from the relay: {error:?}").into());
                }
                other => println!("{who}: (while waiting for {what}) {other:?}"),
            }
        }
    };
    match tokio::time::timeout(STEP_TIMEOUT, waiting).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("{who}: no {what} within {STEP_TIMEOUT:?}").into()),
    }
}

/// Waits for the relay's `Ack` of `id` and fails on a rejection.
async fn wait_for_ack(
    connection: &mut Connection,
    who: &str,
    id: MessageId,
) -> Result<(), Box<dyn Error>> {
    let status = wait_for(connection, who, "the relay's Ack", |event| match event {
        Event::Ack(ack) if ack.message_id == id => Some(ack.status.clone()),
        _ => None,
    })
    .await?;
    match status {
        AckStatus::Accepted => {
            println!("{who}: relay accepted {id}");
            Ok(())
        }
        AckStatus::Rejected {
            code,
            retry_after_ms,
            current_devices,
        } => {
            let name = ErrorCode::from_u16(code).map_or("unknown code", ErrorCode::name);
            Err(format!(
                "{who}: relay rejected {id}: {name} ({code}), retry after {retry_after_ms} ms, \
                 current devices {current_devices:?}"
            )
            .into())
        }
    }
}

/// Declares `devices` as the complete device set of `user` (a user of the connection's own
/// network) and waits for the relay to record it. The relay fans `All` envelopes out to this
/// set; a user without devices is `RECIPIENT_UNKNOWN` to senders.
async fn declare_devices(
    connection: &mut Connection,
    who: &str,
    user: UserAddress,
    devices: Vec<DeviceId>,
) -> Result<(), Box<dyn Error>> {
    let request_id = random_id()?;
    let list = DeviceList {
        request_id,
        user,
        devices,
    };
    connection.send_device_list(&list).await?;
    connection.flush().await?;
    println!("{who}: declared devices {:?} of {user}", list.devices);
    wait_for_ack(connection, who, request_id).await
}

/// Enlists `user` (device 1) through the control API as its network (`stem` names the
/// network's files in the dev PKI): the opt-in signed with the network's key, reachable by
/// everyone, located in Germany now.
async fn enlist(args: &Args, stem: &str, user: UserAddress) -> Result<(), Box<dyn Error>> {
    let pki = args.data_dir.join("pki");
    let (cert, key) = (
        pki.join(format!("{stem}.pem")),
        pki.join(format!("{stem}.key")),
    );
    let tls =
        ClientTls::from_pem_files(&pki.join("ca.pem"), Some((cert.as_path(), key.as_path())))?;
    let api = ControlClient::new(args.api, tls, "localhost")?;
    let network_key = std::fs::read(pki.join(format!("{stem}-token.pk8")))?;
    let at = now_ms();
    let signature = sign_consent(&network_key, &user, at, "everyone", true)?;
    let body = serde_json::json!({
        "consent": {"opted_in_at_ms": at, "model": "everyone", "discoverable": true, "signature": signature},
        "devices": [1],
        "location": {"country": "DE", "observed_at_ms": at},
    });
    let path = format!("/v1/users/{}/{}", user.network.0, user_hex(&user));
    let response = api.put(&path, &body).await?;
    if !response.is_success() {
        return Err(format!(
            "{stem}: enlisting {user} failed: HTTP {} {}",
            response.status, response.body
        )
        .into());
    }
    println!("{stem}: enlisted {user} (consent signed, devices [1], located in DE)");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let gatekeeper_user = UserAddress::new(NetworkId(1), UserId(0x1001));
    let gatekeeper_device = gatekeeper_user.device(DeviceId(1));
    let partner_user = UserAddress::new(NetworkId(2), UserId(0x2002));
    enlist(&args, "gatekeeper", gatekeeper_user).await?;
    enlist(&args, "partner", partner_user).await?;

    let mut partner = connect_as(&args, Role::PartnerServer, "partner.pem", "partner.key").await?;
    let mut gatekeeper = connect_as(
        &args,
        Role::GatekeeperServer,
        "gatekeeper.pem",
        "gatekeeper.key",
    )
    .await?;

    // 0. Each server tells the relay which devices its user has: one, the primary.
    declare_devices(&mut partner, "partner", partner_user, vec![DeviceId(1)]).await?;
    declare_devices(
        &mut gatekeeper,
        "gatekeeper",
        gatekeeper_user,
        vec![DeviceId(1)],
    )
    .await?;

    // 1. The gatekeeper's server sends an envelope on behalf of its user's primary device
    //    and waits until the relay has stored it for every device of the recipient.
    let message_id = random_id()?;
    let envelope = Envelope {
        message_id,
        sender: gatekeeper_device,
        recipient: partner_user,
        devices: DeviceSelection::All,
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: now_ms(),
        ttl_seconds: 3600,
        flags: 0,
    };
    // Stands in for end-to-end ciphertext: the relay never reads it.
    let ciphertext = b"opaque ciphertext: hello from the gatekeeper";
    gatekeeper.send_envelope(&envelope, ciphertext).await?;
    gatekeeper.flush().await?;
    println!("gatekeeper: sent {message_id} from {gatekeeper_device} to {partner_user}");
    wait_for_ack(&mut gatekeeper, "gatekeeper", message_id).await?;

    // 2. The partner's server receives it for its user's device.
    let (device, seq, header, payload) = wait_for(
        &mut partner,
        "partner",
        "the envelope's Delivery",
        |event| match event {
            Event::Delivery {
                device,
                seq,
                inner: Inbound::Envelope { header, payload },
                ..
            } if header.message_id == message_id => {
                Some((*device, *seq, header.clone(), payload.clone()))
            }
            _ => None,
        },
    )
    .await?;
    println!(
        "partner: delivery #{seq} for {device}: {} from {} ({:?}, {} bytes): {:?}",
        header.message_id,
        header.sender,
        header.content_type,
        payload.len(),
        String::from_utf8_lossy(&payload)
    );

    // 3. The partner acks it (the relay removes it from that device's queue) and sends a
    //    delivery receipt from that device back to the original sender's user.
    partner.ack(message_id, device).await?;
    let receipt_id = random_id()?;
    let receipt = Receipt {
        receipt_id,
        kind: ReceiptKind::Delivered,
        sender: device,
        recipient: header.sender.user_address(),
        message_ids: vec![message_id],
        timestamp_ms: now_ms(),
    };
    partner.send_receipt(&receipt).await?;
    partner.flush().await?;
    println!(
        "partner: acked {message_id} for {device}, sent receipt {receipt_id} to {}",
        receipt.recipient
    );
    wait_for_ack(&mut partner, "partner", receipt_id).await?;

    // 4. The gatekeeper's server receives the receipt for its user's device and acks it.
    let (device, seq, receipt) = wait_for(
        &mut gatekeeper,
        "gatekeeper",
        "the receipt's Delivery",
        |event| match event {
            Event::Delivery {
                device,
                seq,
                inner: Inbound::Receipt(receipt),
                ..
            } if receipt.receipt_id == receipt_id => Some((*device, *seq, receipt.clone())),
            _ => None,
        },
    )
    .await?;
    println!(
        "gatekeeper: delivery #{seq} for {device}: {:?} receipt {} from {} for {:?}",
        receipt.kind, receipt.receipt_id, receipt.sender, receipt.message_ids
    );
    gatekeeper.ack(receipt.receipt_id, device).await?;
    gatekeeper.flush().await?;

    gatekeeper.close().await?;
    partner.close().await?;
    println!("done");
    Ok(())
}
