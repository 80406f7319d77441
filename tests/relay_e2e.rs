//! End to end: the relay started in-process (two cores, its development PKI, a port of its own
//! on 127.0.0.1) and the client SDK talking to it over real TLS sockets. Each test has its own
//! relay, so tests are independent and run in parallel. The contract is `docs/protocol.md`,
//! sections 7 (sessions), 8 (delivery) and 9 (error codes).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use client::{
    AckStatus, ClientError, ClientTls, DeviceId, DeviceList, ErrorCode, Event, Role, SignalKind,
    Welcome,
};
use codec::envelope_flags;
use common::{
    GATEKEEPER, PARTNER, Session, TestRelay, device, devices_of, envelope, envelope_listed,
    frame_bytes, new_id, now_ms, payload, probe, probe_signal, probe_within, read_pem, receipt,
    signal, user,
};
use relay::limits::RelayLimits;

/// An envelope from `sender` (served by `from`) to `recipient` (served by `to`), acked, and a
/// `Delivered` receipt back, acked: the whole round trip, checked at every step.
async fn round_trip(
    from: &mut Session,
    sender: client::DeviceAddress,
    to: &mut Session,
    recipient: client::DeviceAddress,
    seqs: (u64, u64),
    tag: &str,
) {
    let env = envelope(sender, recipient.user_address());
    // Larger than one TLS record, so the payload crosses record boundaries both ways.
    let body = payload(tag, 40_000);
    from.send_accepted(&env, &body).await;

    let delivered = to.expect_delivery().await;
    assert_eq!(delivered.device, recipient);
    assert_eq!(delivered.seq, seqs.0);
    assert!(!delivered.ephemeral);
    let (header, got) = delivered.envelope();
    assert_eq!(header, &env, "the envelope arrives exactly as sent");
    assert_eq!(got.as_ref(), &body[..], "the payload arrives intact");
    to.ack_delivery(&delivered).await;

    let back = receipt(recipient, sender.user_address(), &[env.message_id]);
    to.send_receipt(&back).await;
    to.expect_accepted(back.receipt_id).await;

    let delivered = from.expect_delivery().await;
    assert_eq!(delivered.device, sender);
    assert_eq!(delivered.seq, seqs.1);
    assert!(!delivered.ephemeral);
    assert_eq!(delivered.receipt(), &back);
    from.ack_delivery(&delivered).await;
}

// 1.
#[tokio::test]
async fn one_to_one_both_directions_between_servers() {
    let mut relay = TestRelay::start("one_to_one");
    let gk_user = user(GATEKEEPER, 0x1001);
    let p_user = user(PARTNER, 0x2002);
    let mut gk = relay.server(GATEKEEPER).await;
    let mut partner = relay.server(PARTNER).await;
    gk.declare(gk_user, &[1]).await;
    partner.declare(p_user, &[1]).await;

    let gk_dev = gk_user.device(DeviceId(1));
    let p_dev = p_user.device(DeviceId(1));
    round_trip(
        &mut gk,
        gk_dev,
        &mut partner,
        p_dev,
        (1, 1),
        "gatekeeper to partner",
    )
    .await;
    round_trip(
        &mut partner,
        p_dev,
        &mut gk,
        gk_dev,
        (2, 2),
        "partner to gatekeeper",
    )
    .await;

    // Nothing more on either side: a probe each way arrives next.
    probe(&mut gk, gk_dev, &mut partner, p_user, &[1]).await;
    probe(&mut partner, p_dev, &mut gk, gk_user, &[1]).await;
    // Every acked frame left its queue.
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    assert!(relay.metric("relay_shard_released_total") >= 4);
    gk.close().await;
    partner.close().await;
    relay.stop().await;
}

// 2.
#[tokio::test]
async fn device_session_receives_acks_and_replies_as_itself() {
    let mut relay = TestRelay::start("device_mode");
    let gk_user = user(GATEKEEPER, 0x1001);
    let gk_dev = gk_user.device(DeviceId(1));
    let me = device(PARTNER, 0x2002, 1);
    let mut gk = relay.server(GATEKEEPER).await;
    gk.declare(gk_user, &[1]).await;
    let mut dev = relay.device(me).await;
    assert_eq!(dev.conn.welcome().version, 1);

    let env = envelope(gk_dev, me.user_address());
    let body = payload("to the device", 3000);
    gk.send_accepted(&env, &body).await;
    let delivered = dev.expect_delivery().await;
    assert_eq!(delivered.device, me);
    assert_eq!(delivered.seq, 1);
    assert!(!delivered.ephemeral);
    assert_eq!(delivered.envelope().0, &env);
    assert_eq!(delivered.envelope().1.as_ref(), &body[..]);
    dev.ack_delivery(&delivered).await;

    let reply = envelope(me, gk_user);
    let reply_body = payload("reply from the device", 700);
    dev.send_accepted(&reply, &reply_body).await;
    let delivered = gk.expect_delivery().await;
    assert_eq!(delivered.device, gk_dev);
    assert_eq!(delivered.envelope().0, &reply);
    assert_eq!(delivered.envelope().1.as_ref(), &reply_body[..]);
    gk.ack_delivery(&delivered).await;

    // A device session speaks for its own device only, not for its user's other devices.
    let sibling = envelope(device(PARTNER, 0x2002, 2), gk_user);
    dev.send_envelope(&sibling, b"not mine").await;
    dev.expect_rejected(sibling.message_id, ErrorCode::SenderNotAllowed)
        .await;

    // The refused envelope's path (device session → gk_user) carries only the probe after
    // it; and nothing more is due the device.
    probe(&mut dev, me, &mut gk, gk_user, &[1]).await;
    probe(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    dev.close().await;
    gk.close().await;
    relay.stop().await;
}

// 3.
#[tokio::test]
async fn fan_out_to_every_declared_device() {
    let mut relay = TestRelay::start("fan_out");
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    let p_user = user(PARTNER, 0x2002);
    let mut gk = relay.server(GATEKEEPER).await;
    let mut partner = relay.server(PARTNER).await;
    partner.declare(p_user, &[1, 2, 3]).await;

    let env = envelope(gk_dev, p_user);
    let body = payload("fan out", 5000);
    gk.send_accepted(&env, &body).await;
    let deliveries = partner.expect_deliveries(3).await;
    assert_eq!(devices_of(&deliveries), BTreeSet::from([1, 2, 3]));
    for d in &deliveries {
        assert_eq!(d.device.user_address(), p_user);
        assert_eq!(d.seq, 1);
        assert!(!d.ephemeral);
        assert_eq!(d.envelope().0, &env);
        assert_eq!(d.envelope().1.as_ref(), &body[..]);
        partner.ack_delivery(d).await;
    }

    // An explicit list equal to the current set (in any order) fans out the same way.
    let listed = envelope_listed(gk_dev, p_user, &[3, 1, 2]);
    gk.send_accepted(&listed, b"listed").await;
    let deliveries = partner.expect_deliveries(3).await;
    assert_eq!(devices_of(&deliveries), BTreeSet::from([1, 2, 3]));
    for d in &deliveries {
        assert_eq!(d.seq, 2);
        assert_eq!(d.envelope().0, &listed);
        partner.ack_delivery(d).await;
    }

    probe(&mut gk, gk_dev, &mut partner, p_user, &[1, 2, 3]).await;
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    relay.stop().await;
}

// 4.
#[tokio::test]
async fn offline_device_gets_its_backlog_in_order_then_live_traffic() {
    let mut relay = TestRelay::start("offline_backlog");
    let me = device(PARTNER, 0x2002, 1);
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    relay.register_offline_device(me).await;
    let mut gk = relay.server(GATEKEEPER).await;

    let mut sent = Vec::new();
    for i in 0..20 {
        let env = envelope(gk_dev, me.user_address());
        let body = payload(&format!("offline #{i}"), 100 + i);
        gk.send_envelope(&env, &body).await;
        sent.push((env, body));
    }
    // The relay acknowledges each (stored) although the device is offline, in order.
    for (env, _) in &sent {
        gk.expect_accepted(env.message_id).await;
    }

    let mut dev = relay.device(me).await;
    // Live traffic sent the moment the device is back must come after its backlog.
    let live = envelope(gk_dev, me.user_address());
    gk.send_accepted(&live, b"live").await;

    let deliveries = dev.expect_deliveries(21).await;
    for (i, (d, (env, body))) in deliveries.iter().zip(&sent).enumerate() {
        assert_eq!(d.device, me);
        assert_eq!(d.seq, i as u64 + 1, "queue order");
        assert_eq!(d.envelope().0, env, "send order");
        assert_eq!(d.envelope().1.as_ref(), &body[..]);
    }
    let last = &deliveries[20];
    assert_eq!(last.seq, 21);
    assert_eq!(last.envelope().0, &live);
    for d in &deliveries {
        dev.ack_delivery(d).await;
    }
    probe(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    relay.stop().await;
}

/// Protocol section 8, redelivery: frames delivered and not acked are written again from the
/// front of the queue when the device's session closes and it comes back, or when its own
/// session takes over from the server session that carried them.
#[tokio::test]
async fn unacked_deliveries_are_redelivered_when_the_binding_changes() {
    let mut relay = TestRelay::start("redelivery");
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    let mut gk = relay.server(GATEKEEPER).await;

    // A direct device reads three, acks only the first, and goes away.
    let me = device(PARTNER, 0x2002, 1);
    relay.register_offline_device(me).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        let env = envelope(gk_dev, me.user_address());
        gk.send_accepted(&env, format!("#{i}").as_bytes()).await;
        sent.push(env);
    }
    let mut dev = relay.device(me).await;
    let first = dev.expect_deliveries(3).await;
    for (d, env) in first.iter().zip(&sent) {
        assert_eq!(d.envelope().0, env);
    }
    dev.ack_delivery(&first[0]).await;
    dev.close().await;
    // Back: the two unacked ones again, at the same positions, in order; then nothing.
    let mut dev = relay.device(me).await;
    let again = dev.expect_deliveries(2).await;
    for (d, (env, seq)) in again.iter().zip([(&sent[1], 2), (&sent[2], 3)]) {
        assert_eq!(d.envelope().0, env);
        assert_eq!(d.seq, seq);
        dev.ack_delivery(d).await;
    }
    probe(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;
    dev.close().await;

    // A device carried by its network's server session, unacked, then connecting by itself.
    let mut partner = relay.server(PARTNER).await;
    let other = device(PARTNER, 0x3003, 1);
    partner.declare(other.user_address(), &[1]).await;
    let env = envelope(gk_dev, other.user_address());
    gk.send_accepted(&env, b"carried").await;
    let carried = partner.expect_delivery().await;
    assert_eq!(carried.device, other);
    assert_eq!(carried.envelope().0, &env);
    let mut direct = relay.device(other).await;
    let taken_over = direct.expect_delivery().await;
    assert_eq!(taken_over.envelope().0, &env);
    assert_eq!(taken_over.seq, carried.seq);
    direct.ack_delivery(&taken_over).await;
    probe(&mut gk, gk_dev, &mut direct, other.user_address(), &[1]).await;
    // Acked by the device itself: the server session gets nothing more, now or once the
    // device leaves and its binding falls back to the server session. Whatever is left in
    // the device's queue is written before the probe (from the front, on the new binding).
    direct.close().await;
    probe(&mut gk, gk_dev, &mut partner, other.user_address(), &[1]).await;
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    relay.stop().await;
}

// 5.
#[tokio::test]
async fn receipts_reach_every_device_of_the_original_sender() {
    let mut relay = TestRelay::start("receipts");
    let gk_user = user(GATEKEEPER, 0x1001);
    let p_dev = device(PARTNER, 0x2002, 1);
    let mut gk = relay.server(GATEKEEPER).await;
    let mut partner = relay.server(PARTNER).await;
    gk.declare(gk_user, &[1, 2]).await;
    partner.declare(p_dev.user_address(), &[1]).await;

    let env = envelope(gk_user.device(DeviceId(1)), p_dev.user_address());
    gk.send_accepted(&env, b"hello").await;
    let delivered = partner.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &env);
    partner.ack_delivery(&delivered).await;

    let read = client::Receipt {
        kind: client::ReceiptKind::Read,
        ..receipt(p_dev, gk_user, &[env.message_id])
    };
    partner.send_receipt(&read).await;
    partner.expect_accepted(read.receipt_id).await;

    let deliveries = gk.expect_deliveries(2).await;
    assert_eq!(devices_of(&deliveries), BTreeSet::from([1, 2]));
    for d in &deliveries {
        assert_eq!(d.device.user_address(), gk_user);
        assert!(!d.ephemeral);
        assert_eq!(d.receipt(), &read);
        gk.ack_delivery(d).await;
    }
    // The receipt's path (partner session → gk_user) and the envelope's, each probed.
    probe(&mut partner, p_dev, &mut gk, gk_user, &[1, 2]).await;
    probe(
        &mut gk,
        gk_user.device(DeviceId(1)),
        &mut partner,
        p_dev.user_address(),
        &[1],
    )
    .await;
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    relay.stop().await;
}

// 6.
#[tokio::test]
async fn signals_and_ephemeral_envelopes_are_never_queued() {
    let mut relay = TestRelay::start("signals");
    let me = device(PARTNER, 0x2002, 1);
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    relay.register_offline_device(me).await;
    let mut gk = relay.server(GATEKEEPER).await;

    // While the device is offline: a typing signal and an ephemeral envelope, then a normal
    // envelope on the same path, which the relay handles after them.
    gk.send_signal(&signal(
        gk_dev,
        me.user_address(),
        SignalKind::TypingStarted,
    ))
    .await;
    let fleeting = client::Envelope {
        flags: envelope_flags::EPHEMERAL,
        ..envelope(gk_dev, me.user_address())
    };
    gk.send_accepted(&fleeting, b"gone if nobody is there")
        .await;
    let marker = envelope(gk_dev, me.user_address());
    gk.send_accepted(&marker, b"stored").await;

    // Back online: only the stored envelope arrives, first in its queue.
    let mut dev = relay.device(me).await;
    let delivered = dev.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &marker);
    assert_eq!(delivered.seq, 1);
    assert!(!delivered.ephemeral);
    dev.ack_delivery(&delivered).await;
    // Neither offline frame was queued behind it.
    probe(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;

    // Online: a signal arrives at once, flagged ephemeral; the relay acks nothing for it.
    let typing = signal(gk_dev, me.user_address(), SignalKind::TypingStopped);
    gk.send_signal(&typing).await;
    let delivered = dev.expect_delivery().await;
    assert!(delivered.ephemeral);
    assert_eq!(delivered.device, me);
    assert_eq!(delivered.signal(), &typing);
    assert_eq!(delivered.inner.ack_id(), None);

    // An ephemeral envelope to a connected device: accepted, delivered flagged ephemeral.
    let live = client::Envelope {
        flags: envelope_flags::EPHEMERAL,
        ..envelope(gk_dev, me.user_address())
    };
    gk.send_accepted(&live, b"now or never").await;
    let delivered = dev.expect_delivery().await;
    assert!(delivered.ephemeral);
    assert_eq!(delivered.envelope().0, &live);

    // No Ack for the signal (it would come before the probe's), and neither ephemeral frame
    // was written again or queued.
    probe(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    relay.stop().await;
}

// 7.
#[tokio::test]
async fn spoofed_sender_is_rejected_and_the_session_goes_on() {
    let mut relay = TestRelay::start("spoofed_sender");
    let gk_user = user(GATEKEEPER, 0x1001);
    let p_dev = device(PARTNER, 0x2002, 1);
    let mut gk = relay.server(GATEKEEPER).await;
    gk.declare(gk_user, &[1]).await;
    let mut partner = relay.server(PARTNER).await;

    // The partner's server sends as a gatekeeper user.
    let spoof = envelope(gk_user.device(DeviceId(1)), gk_user);
    partner.send_envelope(&spoof, b"forged").await;
    let (retry_after_ms, current) = partner
        .expect_rejected(spoof.message_id, ErrorCode::SenderNotAllowed)
        .await;
    assert_eq!(retry_after_ms, 0);
    assert!(current.is_empty());

    // The same for a receipt (a rejected Ack) and a signal (a non-fatal Error).
    let spoof_receipt = receipt(gk_user.device(DeviceId(1)), gk_user, &[new_id()]);
    partner.send_receipt(&spoof_receipt).await;
    partner
        .expect_rejected(spoof_receipt.receipt_id, ErrorCode::SenderNotAllowed)
        .await;
    partner
        .send_signal(&signal(
            gk_user.device(DeviceId(1)),
            gk_user,
            SignalKind::TypingStarted,
        ))
        .await;
    let error = partner.expect_error(ErrorCode::SenderNotAllowed).await;
    assert!(!error.fatal);

    // The session is still good: a valid envelope goes through. On the forged frames' path
    // (partner session → gk_user), after them: its being next on the gatekeeper's session
    // proves nothing forged reached it, its Ack being next on the partner's that no other
    // answer is due.
    let valid = envelope(p_dev, gk_user);
    partner.send_accepted(&valid, b"genuine").await;
    let delivered = gk.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &valid);
    gk.ack_delivery(&delivered).await;
    relay.stop().await;
}

// 8.
#[tokio::test]
async fn a_stale_device_list_is_refused_with_the_current_set() {
    let mut relay = TestRelay::start("device_list_stale");
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    let p_user = user(PARTNER, 0x2002);
    let mut gk = relay.server(GATEKEEPER).await;
    let mut partner = relay.server(PARTNER).await;
    partner.declare(p_user, &[1, 2, 3]).await;
    // Device 3 is removed.
    partner.declare(p_user, &[1, 2]).await;

    let missing = envelope_listed(gk_dev, p_user, &[1]);
    gk.send_envelope(&missing, b"for 1 only").await;
    let (_, current) = gk
        .expect_rejected(missing.message_id, ErrorCode::DeviceListStale)
        .await;
    assert_eq!(current, vec![1, 2], "misses device 2");

    let removed = envelope_listed(gk_dev, p_user, &[1, 2, 3]);
    gk.send_envelope(&removed, b"for 1, 2, 3").await;
    let (retry_after_ms, current) = gk
        .expect_rejected(removed.message_id, ErrorCode::DeviceListStale)
        .await;
    assert_eq!(current, vec![1, 2], "names removed device 3");
    assert_eq!(retry_after_ms, 0);

    // Re-encrypted for the current set, it goes through; on the refused ones' path, so its
    // deliveries coming next prove those were not delivered.
    let exact = envelope_listed(gk_dev, p_user, &[2, 1]);
    gk.send_accepted(&exact, b"for 1 and 2").await;
    let deliveries = partner.expect_deliveries(2).await;
    assert_eq!(devices_of(&deliveries), BTreeSet::from([1, 2]));
    for d in &deliveries {
        assert_eq!(d.envelope().0, &exact);
        partner.ack_delivery(d).await;
    }
    probe(&mut gk, gk_dev, &mut partner, p_user, &[1, 2]).await;
    relay.stop().await;
}

// 9.
#[tokio::test]
async fn a_resent_message_id_is_acked_again_and_delivered_once() {
    let mut relay = TestRelay::start("duplicate_id");
    let gk_user = user(GATEKEEPER, 0x1001);
    let p_user = user(PARTNER, 0x2002);
    let mut gk = relay.server(GATEKEEPER).await;
    let mut partner = relay.server(PARTNER).await;
    partner.declare(p_user, &[1]).await;

    let env = envelope(gk_user.device(DeviceId(1)), p_user);
    gk.send_envelope(&env, b"once").await;
    gk.send_envelope(&env, b"once").await;
    gk.expect_accepted(env.message_id).await;
    gk.expect_accepted(env.message_id).await;
    let delivered = partner.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &env);
    partner.ack_delivery(&delivered).await;

    // Still within the dedup window after the device acked it: acked, not delivered again.
    gk.send_accepted(&env, b"once").await;
    assert_eq!(relay.metric("relay_shard_duplicates_total"), 2);

    // The id is the sender's: another device of the same user may use it for its own message.
    // Sent on the copies' path (gk session → p_user), its being the next delivery proves
    // neither copy was delivered again.
    let other = client::Envelope {
        sender: gk_user.device(DeviceId(2)),
        ..env.clone()
    };
    gk.send_accepted(&other, b"another sender").await;
    let delivered = partner.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &other);
    partner.ack_delivery(&delivered).await;
    probe(
        &mut gk,
        gk_user.device(DeviceId(1)),
        &mut partner,
        p_user,
        &[1],
    )
    .await;
    relay.stop().await;
}

// 10. Bad credentials, each with its own answer.

fn expect_refused(outcome: Result<client::Connection, ClientError>, code: ErrorCode) {
    match outcome {
        Err(ClientError::Refused {
            code: got, name, ..
        }) if got == code.as_u16() => assert_eq!(name, Some(code)),
        Err(other) => panic!(
            "expected Refused {} ({}), got {other:?}",
            code.name(),
            code.as_u16()
        ),
        Ok(conn) => panic!(
            "expected Refused {}, but the relay welcomed the session: {:?}",
            code.name(),
            conn.welcome()
        ),
    }
}

#[tokio::test]
async fn server_role_without_a_client_certificate_is_refused() {
    let mut relay = TestRelay::start("no_certificate");
    for role in [Role::PartnerServer, Role::GatekeeperServer] {
        let outcome = relay.connect(relay.options(relay.tls(None), role)).await;
        expect_refused(outcome, ErrorCode::CertificateRequired);
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_rejected_by_tls() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut relay = TestRelay::start("unknown_ca");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rogue CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let rogue = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
        .expect("rogue CA");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    params
        .distinguished_name
        .push(DnType::CommonName, "demo-partner");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, &*rogue).expect("leaf certificate");

    // The client trusts the relay's real CA; only its own certificate is foreign.
    let tls = ClientTls::from_pem(
        &read_pem(&relay.pki("ca.pem")),
        Some((cert.pem().as_bytes(), key.serialize_pem().as_bytes())),
    )
    .expect("client TLS");
    let outcome = relay.connect(relay.options(tls, Role::PartnerServer)).await;
    match outcome {
        // The relay's TLS stack refuses the chain with an alert (UnknownCA)...
        Err(ClientError::CertificateRejected(alert)) => {
            eprintln!("unknown CA refused with TLS alert {alert:?}");
        }
        // ...which a TCP reset can overtake: the relay closes while our Hello is unread.
        Err(ClientError::ClosedBeforeWelcome) => {
            eprintln!("unknown CA refused; the alert was lost to the connection's reset");
        }
        Err(other) => panic!("expected a TLS rejection of the certificate, got {other:?}"),
        Ok(conn) => panic!("a foreign certificate was welcomed: {:?}", conn.welcome()),
    }
    // The relay is unharmed.
    let mut partner = relay.server(PARTNER).await;
    partner.declare(user(PARTNER, 7), &[1]).await;
    relay.stop().await;
}

/// A certificate the relay's CA issued but that no network is registered with: the TLS
/// handshake succeeds, the session is refused with CERTIFICATE_UNKNOWN. The dev PKI keeps no
/// CA key, so this relay runs with a PKI of the test's own.
#[tokio::test]
async fn a_trusted_certificate_registered_for_no_network_is_refused() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    use relay::config::TlsPaths;
    use relay::tables::auth::NetworkEntry;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test operator CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
        .expect("CA certificate");
    let leaf = |names: Vec<String>, purpose| {
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &*ca).expect("leaf certificate");
        (cert, key)
    };
    let (server, server_key) = leaf(
        vec!["localhost".to_string()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (registered, registered_key) = leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
    let (stranger, stranger_key) = leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);

    let mut relay = TestRelay::start_configured("certificate_unknown", |dir, config| {
        let write = |file: &str, text: String| {
            let path = dir.join(file);
            std::fs::write(&path, text).expect("write PKI file");
            path
        };
        config.tls = Some(TlsPaths {
            server_cert: write("relay.pem", server.pem()),
            server_key: write("relay.key", server_key.serialize_pem()),
            client_ca: vec![write("ca.pem", ca.pem())],
        });
        config.networks = Some(vec![NetworkEntry {
            id: GATEKEEPER,
            name: "gatekeeper".into(),
            server_roles: vec![Role::GatekeeperServer],
            cert_sha256: vec![devkit::hex::sha256(registered.der())],
            token_public_key: None,
            client_ca_der: Vec::new(),
        }]);
    });
    let ca_pem = ca.pem();
    let tls_with = |cert: &rcgen::Certificate, key: &KeyPair| {
        ClientTls::from_pem(
            ca_pem.as_bytes(),
            Some((cert.pem().as_bytes(), key.serialize_pem().as_bytes())),
        )
        .expect("client TLS")
    };

    // The registered certificate is welcomed...
    let mut gk = Session::new(
        "registered",
        relay
            .connect(relay.options(
                tls_with(&registered, &registered_key),
                Role::GatekeeperServer,
            ))
            .await
            .expect("the registered certificate connects"),
    );
    gk.declare(user(GATEKEEPER, 1), &[1]).await;
    // ...the other one, from the same CA, speaks for no network.
    for role in [Role::GatekeeperServer, Role::PartnerServer] {
        let outcome = relay
            .connect(relay.options(tls_with(&stranger, &stranger_key), role))
            .await;
        expect_refused(outcome, ErrorCode::CertificateUnknown);
    }
    // A network without a token key has no direct devices.
    let token = relay.token_signed(
        &client::generate_network_key(),
        device(GATEKEEPER, 1, 2),
        now_ms() + 60_000,
    );
    let outcome = relay
        .connect(
            relay
                .options(tls_with(&registered, &registered_key), Role::Device)
                .token(token),
        )
        .await;
    expect_refused(outcome, ErrorCode::TokenInvalid);
    // The refused sessions left the registered one alone: its user's device is still bound
    // to it, with nothing queued or answered ahead of a probe.
    probe_within(&mut gk, device(GATEKEEPER, 2, 1), user(GATEKEEPER, 1), &[1]).await;
    gk.close().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_certificate_asking_for_another_role_is_refused() {
    let mut relay = TestRelay::start("role_not_allowed");
    let partner_as_gatekeeper = relay
        .connect(relay.options(relay.tls(Some(PARTNER)), Role::GatekeeperServer))
        .await;
    expect_refused(partner_as_gatekeeper, ErrorCode::RoleNotAllowed);
    let gatekeeper_as_partner = relay
        .connect(relay.options(relay.tls(Some(GATEKEEPER)), Role::PartnerServer))
        .await;
    expect_refused(gatekeeper_as_partner, ErrorCode::RoleNotAllowed);
    relay.stop().await;
}

#[tokio::test]
async fn device_tokens_are_checked() {
    let mut relay = TestRelay::start("device_tokens");
    let me = device(PARTNER, 0x2002, 1);
    let device_options = |token: Option<client::DeviceToken>| {
        let options = relay.options(relay.tls(None), Role::Device);
        match token {
            Some(token) => options.token(token),
            None => options,
        }
    };

    // No token.
    expect_refused(
        relay.connect(device_options(None)).await,
        ErrorCode::TokenRequired,
    );
    // Expired a minute ago (correctly signed).
    let expired = relay.token_signed(&relay.token_key(PARTNER), me, now_ms() - 60_000);
    expect_refused(
        relay.connect(device_options(Some(expired))).await,
        ErrorCode::TokenExpired,
    );
    // Signed by a key the relay does not know, and by another network's key.
    let stranger = client::generate_network_key();
    let forged = relay.token_signed(&stranger, me, now_ms() + 60_000);
    expect_refused(
        relay.connect(device_options(Some(forged))).await,
        ErrorCode::TokenInvalid,
    );
    let cross = relay.token_signed(&relay.token_key(GATEKEEPER), me, now_ms() + 60_000);
    expect_refused(
        relay.connect(device_options(Some(cross))).await,
        ErrorCode::TokenInvalid,
    );
    // Used twice: the first session is welcomed, the second refused.
    let token = relay.token(me);
    let mut first = Session::new(
        "first use",
        relay
            .connect(device_options(Some(token.clone())))
            .await
            .expect("a fresh token is accepted"),
    );
    expect_refused(
        relay.connect(device_options(Some(token))).await,
        ErrorCode::TokenReplayed,
    );
    // The replay took nothing from the first session: the device's deliveries still go to
    // it, with nothing ahead of a probe.
    let mut gk = relay.server(GATEKEEPER).await;
    probe(
        &mut gk,
        device(GATEKEEPER, 0x1001, 1),
        &mut first,
        me.user_address(),
        &[1],
    )
    .await;
    first.close().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_hello_without_a_common_version_is_refused() {
    let mut relay = TestRelay::start("unsupported_version");
    let mut options = relay.options(relay.tls(Some(PARTNER)), Role::PartnerServer);
    options.version_min = 5;
    options.version_max = 6;
    match relay.connect(options).await {
        Err(ClientError::Refused { code, reason, .. }) => {
            assert_eq!(code, ErrorCode::UnsupportedVersion.as_u16());
            // The reason names the relay's range (for people, but it must be there).
            assert!(
                reason.contains('1'),
                "reason {reason:?} names the relay's versions"
            );
        }
        other => panic!("expected UNSUPPORTED_VERSION, got {other:?}"),
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_first_frame_other_than_hello_is_refused() {
    let mut relay = TestRelay::start("hello_required");
    let mut raw = relay.raw_tls(&relay.tls(Some(PARTNER))).await;
    let env = envelope(device(PARTNER, 1, 1), user(GATEKEEPER, 1));
    raw.write(&frame_bytes(&env, b"too early")).await;
    assert!(
        raw.expect_error(ErrorCode::HelloRequired).await,
        "HELLO_REQUIRED is fatal"
    );
    raw.expect_end().await;
    relay.stop().await;
}

// 11.

/// A gatekeeper server sends to a partner device connected directly, which acks, over and
/// over until told to stop; every step is checked. Returns the rounds completed.
async fn keep_talking(
    mut sender: Session,
    mut receiver: Session,
    to: client::UserAddress,
    stop: Arc<AtomicBool>,
) -> usize {
    let from = device(GATEKEEPER, 0x1001, 1);
    let mut rounds = 0;
    while !stop.load(Ordering::Relaxed) || rounds < 3 {
        let env = envelope(from, to);
        let body = payload(&format!("background #{rounds}"), 2000);
        sender.send_accepted(&env, &body).await;
        let delivered = receiver.expect_delivery().await;
        assert_eq!(delivered.envelope().0, &env);
        assert_eq!(delivered.envelope().1.as_ref(), &body[..]);
        receiver.ack_delivery(&delivered).await;
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    probe(&mut sender, from, &mut receiver, to, &[1]).await;
    sender.close().await;
    receiver.close().await;
    rounds
}

/// A valid envelope from a hostile session, delivered to the partner server: the hostile
/// session still works.
async fn valid_round(session: &mut Session, partner: &mut Session, body: &[u8]) {
    let env = envelope(device(GATEKEEPER, 0x1001, 1), user(PARTNER, 0x2002));
    session.send_accepted(&env, body).await;
    let delivered = partner.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &env);
    assert_eq!(delivered.envelope().1.as_ref(), body);
    partner.ack_delivery(&delivered).await;
}

#[tokio::test]
async fn hostile_frames_hurt_only_their_own_session() {
    let limits = RelayLimits {
        payload_bytes_max: 16 * 1024,
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("hostile_frames", limits);
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    let p2 = user(PARTNER, 0x2002);

    // The unrelated pair: a gatekeeper server and partner device 0xB0B/1, talking throughout.
    let bystander_user = user(PARTNER, 0xB0B);
    let bystander = relay.device(bystander_user.device(DeviceId(1))).await;
    let talker = relay.server(GATEKEEPER).await;
    let stop = Arc::new(AtomicBool::new(false));
    let background = tokio::spawn(keep_talking(
        talker,
        bystander,
        bystander_user,
        stop.clone(),
    ));

    // Where the hostile sessions' valid envelopes go.
    let mut partner = relay.server(PARTNER).await;
    partner.declare(p2, &[1]).await;

    // A malformed header (an enum tag out of range): a non-fatal error, the session goes on.
    let mut hostile = relay.server(GATEKEEPER).await;
    assert_eq!(
        hostile.conn.welcome().limits.payload_bytes_max,
        16 * 1024,
        "Welcome announces the relay's own limit"
    );
    let mut bytes = frame_bytes(&envelope(gk_dev, p2), b"x").to_vec();
    let header_len = usize::from(u16::from_le_bytes([bytes[6], bytes[7]]));
    let root = 8 + header_len - 87;
    bytes[root + 69] = 0xEE; // content_type: 9 variants
    hostile.send_raw(&bytes).await;
    let error = hostile.expect_error(ErrorCode::HeaderMalformed).await;
    assert!(!error.fatal);
    valid_round(&mut hostile, &mut partner, b"after a malformed header").await;

    // An unknown kind and a frame only the relay sends: each a non-fatal error.
    let mut bytes = frame_bytes(&envelope(gk_dev, p2), b"x").to_vec();
    bytes[4] = 42;
    hostile.send_raw(&bytes).await;
    assert!(!hostile.expect_error(ErrorCode::UnknownKind).await.fatal);
    let welcome = Welcome {
        version: 1,
        session_id: 1,
        features: 0,
        limits: hostile.conn.welcome().limits,
    };
    hostile.send_raw(&frame_bytes(&welcome, &[])).await;
    assert!(!hostile.expect_error(ErrorCode::UnexpectedFrame).await.fatal);

    // A payload above the relay's limit (within the codec's): a rejected Ack. At the limit: fine.
    let big = envelope(gk_dev, p2);
    hostile
        .send_envelope(&big, &payload("big", 16 * 1024 + 1))
        .await;
    hostile
        .expect_rejected(big.message_id, ErrorCode::PayloadTooLarge)
        .await;
    valid_round(
        &mut hostile,
        &mut partner,
        &payload("at the limit", 16 * 1024),
    )
    .await;
    // Above the codec's limit (raw; the SDK would not encode it): a non-fatal Error.
    let mut bytes = frame_bytes(&envelope(gk_dev, p2), &[]).to_vec();
    let extra = codec::limits::PAYLOAD_BYTES_MAX + 1;
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
        + u32::try_from(extra).expect("fits");
    bytes[..4].copy_from_slice(&len.to_le_bytes());
    bytes.resize(bytes.len() + extra, 0x5A);
    hostile.send_raw(&bytes).await;
    assert!(!hostile.expect_error(ErrorCode::PayloadTooLarge).await.fatal);
    // Each valid round travels the hostile frames' path after them: its Ack next on the
    // hostile session and its delivery next on the partner's prove no other answer or
    // delivery came of them.
    valid_round(&mut hostile, &mut partner, b"after an oversized payload").await;
    hostile.close().await;

    // An oversized length prefix: fatal FRAME_TOO_LARGE, and the relay closes.
    let mut oversized = relay.server(GATEKEEPER).await;
    let body = u32::try_from(codec::limits::FRAME_BYTES_MAX).expect("fits");
    let mut bytes = body.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[3, 1, 0, 0]);
    oversized.send_raw(&bytes).await;
    assert!(oversized.expect_error(ErrorCode::FrameTooLarge).await.fatal);
    oversized.expect_closed().await;

    // A length prefix below the preamble: fatal FRAME_TOO_SHORT.
    let mut short = relay.server(GATEKEEPER).await;
    short.send_raw(&2u32.to_le_bytes()).await;
    assert!(short.expect_error(ErrorCode::FrameTooShort).await.fatal);
    short.expect_closed().await;

    // Half a frame, then our side closes: the relay ends the session; nothing is delivered.
    let mut truncated = relay.server(GATEKEEPER).await;
    let bytes = frame_bytes(&envelope(gk_dev, p2), &payload("cut", 4000));
    truncated.send_raw(&bytes[..bytes.len() / 2]).await;
    truncated
        .conn
        .close()
        .await
        .expect("close after half a frame");
    match truncated.event().await {
        Event::Closed => {}
        // The relay may name the truncation before it closes.
        Event::Error(error) if error.code == ErrorCode::FrameTruncated.as_u16() => {
            truncated.expect_closed().await;
        }
        other => panic!("expected the session to end, got {other:?}"),
    }
    // Its session is gone, so the probe comes from another: whatever the closed sessions
    // routed was in its shard's inbox before the relay closed them; once every core has
    // handled its inbox, a probe to the same user is queued behind it.
    relay.settle().await;
    let mut prober = relay.server(GATEKEEPER).await;
    valid_round(&mut prober, &mut partner, b"probe").await;

    stop.store(true, Ordering::Relaxed);
    let rounds = tokio::time::timeout(Duration::from_secs(30), background)
        .await
        .expect("the bystander pair finishes")
        .expect("the bystander pair saw nothing unusual");
    assert!(rounds >= 3);
    // Nothing the hostile sessions sent reached anyone: the bystander pair checked each of
    // its events, and the partner's session saw each probe above next.
    partner.close().await;
    relay.stop().await;
}

// 12.
#[tokio::test]
async fn a_full_queue_pushes_back_and_loses_nothing_acked() {
    let limits = RelayLimits {
        device_queue_depth_max: 5,
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("queue_full", limits);
    let me = device(PARTNER, 0x2002, 1);
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    relay.register_offline_device(me).await;
    let mut gk = relay.server(GATEKEEPER).await;

    let mut accepted = Vec::new();
    for i in 0..5 {
        let env = envelope(gk_dev, me.user_address());
        gk.send_accepted(&env, format!("queued #{i}").as_bytes())
            .await;
        accepted.push(env);
    }
    let sixth = envelope(gk_dev, me.user_address());
    gk.send_envelope(&sixth, b"one too many").await;
    let (retry_after_ms, current) = gk
        .expect_rejected(sixth.message_id, ErrorCode::QueueFull)
        .await;
    assert!(retry_after_ms > 0, "QUEUE_FULL carries a retry hint");
    assert!(current.is_empty());
    assert!(ErrorCode::QueueFull.is_retryable());

    let mut dev = relay.device(me).await;
    let deliveries = dev.expect_deliveries(5).await;
    for (i, (d, env)) in deliveries.iter().zip(&accepted).enumerate() {
        assert_eq!(d.seq, i as u64 + 1);
        assert_eq!(d.envelope().0, env);
        assert_eq!(d.envelope().1.as_ref(), format!("queued #{i}").as_bytes());
    }
    // The refused sixth was not queued after all (it would be delivered at once, ahead of
    // the probe; a signal, as the full queue refuses envelopes).
    probe_signal(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;
    for d in &deliveries {
        dev.ack_delivery(d).await;
    }

    // Retried as the code says, the refused envelope goes through once there is room.
    let mut attempts = 0;
    loop {
        attempts += 1;
        gk.send_envelope(&sixth, b"one too many").await;
        match gk.expect_ack(sixth.message_id).await.status {
            AckStatus::Accepted => break,
            AckStatus::Rejected {
                code,
                retry_after_ms,
                ..
            } if code == ErrorCode::QueueFull.as_u16() && attempts < 50 => {
                tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms))).await;
            }
            other => panic!("retrying the sixth envelope: {other:?}"),
        }
    }
    let delivered = dev.expect_delivery().await;
    assert_eq!(delivered.seq, 6);
    assert_eq!(delivered.envelope().0, &sixth);
    dev.ack_delivery(&delivered).await;
    probe(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    relay.stop().await;
}

// 13.

/// Reads a session to its end during shutdown; `true` if the relay said SHUTTING_DOWN.
async fn expect_shutdown(session: &mut Session) -> bool {
    match session.event().await {
        Event::Error(error) if error.code == ErrorCode::ShuttingDown.as_u16() => {
            assert!(error.fatal, "SHUTTING_DOWN is fatal");
            session.expect_closed().await;
            true
        }
        Event::Closed => false,
        other => panic!(
            "{}: expected SHUTTING_DOWN or the end, got {other:?}",
            session.name
        ),
    }
}

#[tokio::test]
async fn stopping_tells_open_sessions_and_returns() {
    let mut relay = TestRelay::start("shutdown");
    let gk_user = user(GATEKEEPER, 0x1001);
    let me = device(PARTNER, 0x2002, 1);
    let mut gk = relay.server(GATEKEEPER).await;
    let mut partner = relay.server(PARTNER).await;
    gk.declare(gk_user, &[1]).await;
    let mut dev = relay.device(me).await;
    let env = envelope(gk_user.device(DeviceId(1)), me.user_address());
    gk.send_accepted(&env, b"before the end").await;
    let delivered = dev.expect_delivery().await;
    dev.ack_delivery(&delivered).await;

    let addr = relay.addr;
    let (took, saw_gk, saw_partner, saw_dev) = tokio::join!(
        relay.stop(),
        expect_shutdown(&mut gk),
        expect_shutdown(&mut partner),
        expect_shutdown(&mut dev),
    );
    eprintln!(
        "stop took {took:?}; SHUTTING_DOWN seen by gatekeeper {saw_gk}, partner {saw_partner}, \
         device {saw_dev}"
    );
    // Every session was closed and accounted for before the cores exited, none abandoned at
    // the stop grace deadline.
    assert_eq!(
        relay.metric("relay_connections"),
        0,
        "{}",
        relay.metrics_text()
    );
    // Stopped: no new sessions.
    let options = client::ConnectOptions::new(addr, relay.tls(None), Role::Device)
        .token(relay.token(me))
        .connect_timeout(Duration::from_secs(5));
    match client::connect(options).await {
        Err(error) => eprintln!("connecting after stop: {error}"),
        Ok(conn) => panic!("a stopped relay welcomed a session: {:?}", conn.welcome()),
    }
}

/// With a single server session, a core without connections of its own usually stops first;
/// the other must still close its session properly although the session's detach has no live
/// core to go to. Which core the session lands on is up to the kernel, so three relays.
#[tokio::test]
async fn stopping_with_one_server_session_closes_it_properly() {
    for round in 0..3 {
        let mut relay = TestRelay::start(&format!("shutdown_one_{round}"));
        let mut gk = relay.server(GATEKEEPER).await;
        gk.declare(user(GATEKEEPER, 0x1001), &[1]).await;
        let (took, saw) = tokio::join!(relay.stop(), expect_shutdown(&mut gk));
        eprintln!("stop took {took:?}; SHUTTING_DOWN seen: {saw}");
        assert_eq!(
            relay.metric("relay_connections"),
            0,
            "a session was abandoned at the stop deadline:\n{}",
            relay.metrics_text()
        );
    }
}

// 14.
#[tokio::test]
async fn device_list_rules() {
    let mut relay = TestRelay::start("device_list_rules");
    let p_user = user(PARTNER, 0x2002);
    let gk_user = user(GATEKEEPER, 0x1001);
    let mut partner = relay.server(PARTNER).await;

    // A server declares only its own network's users.
    let status = partner.declare_status(gk_user, &[1]).await;
    match status {
        AckStatus::Rejected { code, .. } => {
            assert_eq!(code, ErrorCode::SenderNotAllowed.as_u16());
        }
        AckStatus::Accepted => panic!("a partner declared a gatekeeper user's devices"),
    }
    // More than devices_per_user_max (5) distinct devices: DEVICE_LIMIT; five are fine, and
    // a repeated id counts once.
    match partner.declare_status(p_user, &[1, 2, 3, 4, 5, 6]).await {
        AckStatus::Rejected { code, .. } => assert_eq!(code, ErrorCode::DeviceLimit.as_u16()),
        AckStatus::Accepted => panic!("six devices were accepted"),
    }
    partner.declare(p_user, &[1, 2, 3, 4, 5, 5]).await;

    // A device session may not declare devices: UNEXPECTED_FRAME, and it goes on.
    let other = user(PARTNER, 0x3003);
    let mut dev = relay.device(other.device(DeviceId(1))).await;
    let list = DeviceList {
        request_id: new_id(),
        user: other,
        devices: vec![DeviceId(1), DeviceId(2)],
    };
    dev.send_device_list(&list).await;
    let error = dev.expect_error(ErrorCode::UnexpectedFrame).await;
    assert!(!error.fatal);
    assert_eq!(error.refers_to, Some(list.request_id));
    let mut gk = relay.server(GATEKEEPER).await;
    let env = envelope(gk_user.device(DeviceId(1)), other);
    gk.send_accepted(&env, b"still there?").await;
    let delivered = dev.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &env);
    dev.ack_delivery(&delivered).await;

    // A sixth device of a user that has five cannot connect either: fatal DEVICE_LIMIT.
    let mut sixth = relay.device(p_user.device(DeviceId(6))).await;
    let error = sixth.expect_error(ErrorCode::DeviceLimit).await;
    assert!(error.fatal);
    sixth.expect_closed().await;

    // The five declared devices are the fan-out set.
    let env = envelope(gk_user.device(DeviceId(1)), p_user);
    gk.send_accepted(&env, b"to five").await;
    let deliveries = partner.expect_deliveries(5).await;
    assert_eq!(devices_of(&deliveries), BTreeSet::from([1, 2, 3, 4, 5]));
    for d in &deliveries {
        partner.ack_delivery(d).await;
    }
    let gk_dev = gk_user.device(DeviceId(1));
    probe(&mut gk, gk_dev, &mut partner, p_user, &[1, 2, 3, 4, 5]).await;
    probe(&mut gk, gk_dev, &mut dev, other, &[1]).await;
    // The refused device list left no answer behind: a device list's Ack waits for the log
    // like an envelope's, so it would come before the probe's.
    probe_within(&mut dev, other.device(DeviceId(1)), other, &[1]).await;
    relay.stop().await;
}

// 15.
#[tokio::test]
async fn an_expired_frame_is_never_delivered() {
    let mut relay = TestRelay::start("ttl");
    let me = device(PARTNER, 0x2002, 1);
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    relay.register_offline_device(me).await;
    let mut gk = relay.server(GATEKEEPER).await;

    let short = client::Envelope {
        ttl_seconds: 1,
        ..envelope(gk_dev, me.user_address())
    };
    gk.send_accepted(&short, b"short-lived").await;
    let long = envelope(gk_dev, me.user_address());
    gk.send_accepted(&long, b"long-lived").await;
    // Already expired on arrival: MESSAGE_EXPIRED.
    let stale = client::Envelope {
        ttl_seconds: 1,
        timestamp_ms: now_ms() - 60_000,
        ..envelope(gk_dev, me.user_address())
    };
    gk.send_envelope(&stale, b"too late").await;
    gk.expect_rejected(stale.message_id, ErrorCode::MessageExpired)
        .await;

    tokio::time::sleep(Duration::from_millis(2200)).await;
    relay
        .wait_metric("relay_shard_expired_total", |n| n >= 1)
        .await;
    let mut dev = relay.device(me).await;
    let delivered = dev.expect_delivery().await;
    assert_eq!(
        delivered.envelope().0,
        &long,
        "only the long-lived one is left"
    );
    assert_eq!(delivered.seq, 2);
    dev.ack_delivery(&delivered).await;
    // The expired one is not delivered late: it would come before the probe.
    probe(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;
    assert_eq!(relay.metric("relay_shard_expired_total"), 1);
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    relay.stop().await;
}

/// A core keeps taking work while another core is stalled with a full inbox: its inbox task
/// does not wait for room in the other's inbox (what it cannot send waits in its outgoing
/// batches), so two cores with full inboxes never wait on each other. Core 1 is held with
/// its inbox full; core 0 is handed work whose every output is for core 1, then a barrier,
/// which it must answer while core 1 is still held. Once released, both catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cores_with_full_inboxes_make_progress() {
    use relay::core::ConnId;
    use relay::core::shard::interface::{Routed, ShardInput};
    use relay::io::shared::WorkerMsg;

    let limits = RelayLimits {
        cross_core_inbox_batches_max: 1,
        ..RelayLimits::default()
    };
    let relay = TestRelay::start_with("full_inboxes", limits);
    let shared = relay.shared().clone();
    assert_eq!(shared.cores, 2);
    // Envelopes for users of `core`'s shard whose acks go to a connection of the other core.
    let flood = |core: u16, count: usize| -> Vec<WorkerMsg> {
        let other = ConnId {
            core: 1 - core,
            slot: 999_999,
            generation: 1,
        };
        (0u128..)
            .map(|u| common::user(PARTNER, u))
            .filter(|u| relay::core::shard_of(u, 2) == core)
            .take(count)
            .map(|recipient| {
                WorkerMsg::Shard(ShardInput::Envelope(Routed {
                    sender: device(GATEKEEPER, 1, 1),
                    recipient,
                    listed: None,
                    id: common::new_id(),
                    ephemeral: false,
                    ttl_seconds: 60,
                    frame: bytes::Bytes::from_static(b"never decoded"),
                    reply_to: other,
                }))
            })
            .collect()
    };
    let held = common::hold_core(&shared, 1).await;
    let (to_core_1, to_core_0) = (flood(1, 1000), flood(0, 1000));
    let (senders, notifies) = (shared.senders.clone(), shared.notifies.clone());
    let answered = tokio::task::spawn_blocking(move || {
        // Core 1's inbox is full behind the hold; core 0's work is all for core 1.
        senders[1].send(to_core_1).unwrap();
        senders[0].send(to_core_0).unwrap();
        notifies[0].notify_one();
        let (done, handled) = crossbeam_channel::bounded(1);
        senders[0].send(vec![WorkerMsg::Barrier(done)]).unwrap();
        notifies[0].notify_one();
        handled.recv_timeout(Duration::from_secs(10)).is_ok()
    })
    .await
    .unwrap();
    assert!(
        answered,
        "core 0 stopped taking work while core 1's inbox was full"
    );
    drop(held);
    tokio::time::timeout(Duration::from_secs(30), common::settle_cores(&shared))
        .await
        .expect("the cores did not catch up once released");
}

/// A backlog written out in one go when its device comes back is not a slow consumer: with
/// more than twice `connection_pending_bytes_max` queued (within the delivery window), the
/// device reads every frame and acknowledges them on the same session, which stays open.
#[tokio::test]
async fn a_backlog_burst_is_not_a_slow_consumer() {
    let limits = RelayLimits {
        connection_pending_bytes_max: u32::try_from(codec::limits::FRAME_BYTES_MAX)
            .expect("a frame fits in u32"),
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("backlog_burst", limits);
    let me = device(PARTNER, 0x2004, 1);
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    relay.register_offline_device(me).await;
    let mut gk = relay.server(GATEKEEPER).await;
    let body = payload("burst", 16 * 1024);
    let count = 3 * limits.connection_pending_bytes_max as usize / body.len();
    assert!(count < limits.device_deliveries_in_flight_max as usize);
    let mut sent = Vec::new();
    for _ in 0..count {
        let env = envelope(gk_dev, me.user_address());
        gk.send_accepted(&env, &body).await;
        sent.push(env);
    }
    let mut dev = relay.device(me).await;
    let deliveries = dev.expect_deliveries(count).await;
    for (d, env) in deliveries.iter().zip(&sent) {
        assert_eq!(d.envelope().0, env, "send order");
        dev.ack_delivery(d).await;
    }
    probe(&mut gk, gk_dev, &mut dev, me.user_address(), &[1]).await;
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    assert_eq!(relay.metric("relay_slow_consumer_closes_total"), 0);
    relay.stop().await;
}
