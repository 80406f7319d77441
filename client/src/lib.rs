//! The Article 7 Relay partner SDK: connect to a relay as a partner server, a gatekeeper
//! server or a single device, send envelopes, receipts and signals, and receive what the relay
//! delivers.
//!
//! ```no_run
//! use client::{ClientTls, ConnectOptions, Event, connect};
//! use client::codec::Role;
//! use std::path::Path;
//!
//! # async fn run() -> Result<(), client::ClientError> {
//! let tls = ClientTls::from_pem_files(
//!     Path::new("relay-data/pki/ca.pem"),
//!     Some((Path::new("relay-data/pki/partner.pem"), Path::new("relay-data/pki/partner.key"))),
//! )?;
//! let mut connection =
//!     connect(ConnectOptions::new("127.0.0.1:7700".parse().unwrap(), tls, Role::PartnerServer))
//!         .await?;
//! println!("session {}", connection.session_id());
//! let (mut sender, mut receiver) = connection.into_split();
//! loop {
//!     match receiver.next_event().await? {
//!         event @ Event::Delivery { .. } => {
//!             if let Some((message_id, device)) = event.ack_needed() {
//!                 sender.ack_now(message_id, device).await?;
//!             }
//!         }
//!         Event::Closed => break,
//!         other => println!("{other:?}"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The session follows `docs/protocol.md`: TLS 1.3 with a client certificate (which says the
//! network and the roles allowed), then `Hello`/`Welcome`. Delivery is at least once: ack each
//! delivered envelope or receipt with the delivery's device address once it is safely handled,
//! and expect the occasional redelivery of an unacked frame after a reconnect.
//!
//! Under sustained load, keep reading while your writes wait: the relay stops reading a client
//! whose deliveries it cannot write, so a loop that reads and then awaits its own writes (as
//! above) can stall together with the relay once both directions' buffers are full. Send acks
//! from another task (a channel to the `Sender`), as `benches/throughput.rs` does.
//!
//! Frame and id types come from the [`codec`] crate, re-exported here.

mod connection;
pub mod control;
mod error;
mod event;
mod tls;
mod token;

pub use codec;
pub use connection::{
    AUTO_FLUSH_BYTES, ConnectOptions, Connection, DEFAULT_AGENT, DEFAULT_CONNECT_TIMEOUT, Receiver,
    Sender, connect,
};
pub use error::ClientError;
pub use event::{Event, Inbound};
pub use tls::ClientTls;
pub use token::{generate_network_key, mint_device_token, network_public_key, verify_device_token};

// The types every caller needs, so simple uses need no direct `codec` dependency.
pub use codec::{
    Ack, AckStatus, ContentType, DeviceAddress, DeviceId, DeviceList, DeviceSelection, DeviceToken,
    E2eProtocol, Envelope, ErrorCode, ErrorFrame, KeepAlive, MessageId, NetworkId, Notice, Receipt,
    ReceiptKind, Role, Signal, SignalKind, UserAddress, UserId, Welcome, features,
};
