//! The HTTP port: `/metrics` and `/healthz` in plain HTTP (what a Prometheus scraper and a
//! load balancer speak), and the control API (`/v1/...`) over TLS 1.3 with the same client
//! certificates as the data plane. Both on one port: the first byte of a connection tells a
//! TLS ClientHello (0x16) from a plain request, so operators keep one address and scrapers
//! need no certificate. Served by axum over hyper on a small tokio runtime of its own, off
//! the data plane's cores; control-plane work (store commits) runs on its blocking pool.
//!
//! Nothing a client does holds the port: every connection has a slot (at most
//! `http.connections_per_source_max` per source, `http.connections_max` in all) and
//! deadlines for its handshake, its request head, its writes and its silence; the listener
//! never stops accepting. When the general lane is full a connection is served on a small
//! reserved lane that answers only `/healthz` and `/metrics` (one request, a short deadline):
//! a load balancer and a scraper keep their answers during a flood without a second port or
//! address to configure. (A listener of their own would be as good against a flood, but an
//! operator would have to add and firewall one.) Past both lanes a connection is closed at
//! once. See docs/operations.md.

pub mod api;
pub mod body;
pub mod context;
pub mod deadline;
pub mod limits;
pub mod metrics;
pub mod sources;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

pub use self::context::{Guard, HttpContext, Origin, Peer, Render};
use self::deadline::{Activity, Watched};
use self::limits::HttpLimits;
use self::metrics::Closed;
use self::sources::{Lane, Source, Ticket};

#[derive(Debug)]
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(addr: SocketAddr, context: HttpContext) -> Result<HttpServer, String> {
        context.limits.validate()?;
        let std_listener =
            std::net::TcpListener::bind(addr).map_err(|e| format!("http_listen {addr}: {e}"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let addr = std_listener.local_addr().map_err(|e| e.to_string())?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("relay-http".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("relay-http")
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => return tracing::error!("http runtime: {e}"),
                };
                runtime.block_on(serve(std_listener, context, stop_rx));
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|e| e.to_string())?;
        Ok(HttpServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What one connection is served with.
#[derive(Clone)]
struct Lanes {
    general: axum::Router,
    reserved: axum::Router,
    tls: Option<Arc<ServerConfig>>,
    guard: Arc<Guard>,
}

async fn serve(
    std_listener: std::net::TcpListener,
    mut context: HttpContext,
    mut stop: oneshot::Receiver<()>,
) {
    let Ok(listener) = TcpListener::from_std(std_listener) else {
        return;
    };
    if let Some(control) = context.control.clone() {
        tokio::spawn(api::run_background(control));
    }
    let guard = Arc::new(Guard::new(context.limits));
    let data_plane = context.render.clone();
    let counters = guard.clone();
    context.render = Arc::new(move || {
        let mut text = data_plane();
        let sources = sources::lock(&counters.sources);
        counters.metrics.render(&mut text, &sources);
        text
    });
    let lanes = Lanes {
        general: api::router(context.clone()),
        reserved: api::reserved_router(context.clone()),
        tls: context.tls.clone(),
        guard,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, from)) = accepted else { continue };
                let source = Source::of(from.ip());
                match Ticket::admit(&lanes.guard.sources, source, Instant::now()) {
                    Ok(ticket) => {
                        lanes.guard.metrics.accepted(ticket.lane);
                        tokio::spawn(serve_connection(stream, ticket, lanes.clone()));
                    }
                    // Closed at once: waiting for a slot would leave the listener, and every
                    // probe behind it, stuck.
                    Err(refusal) => lanes.guard.metrics.refused(refusal),
                }
            }
            _ = &mut stop => return,
        }
    }
}

/// Serves one connection on its lane until it ends or misses a deadline; the ticket gives
/// its slot back when this returns.
async fn serve_connection(stream: TcpStream, ticket: Ticket, lanes: Lanes) {
    let limits = lanes.guard.limits;
    let activity = Arc::new(Activity::new(Instant::now()));
    let watched = Watched::new(stream, activity.clone());
    let lane = ticket.lane;
    let router = match lane {
        Lane::General => lanes.general.clone(),
        Lane::Reserved => lanes.reserved.clone(),
    };
    let work = async {
        tokio::select! {
            closed = serve_stream(watched, router, lanes.tls.clone(), &ticket, lanes.guard.clone()) => closed,
            expired = deadline::watch(&activity, limits.write_timeout(), limits.idle_timeout()) => {
                Some(Closed::Deadline(expired))
            }
        }
    };
    let closed = match lane {
        Lane::General => work.await,
        Lane::Reserved => tokio::time::timeout(limits.reserved_deadline(), work)
            .await
            .unwrap_or(Some(Closed::Reserved)),
    };
    if let Some(closed) = closed {
        lanes.guard.metrics.closed(closed);
    }
    drop(ticket);
}

/// Tells TLS from plain HTTP, completes the handshake and serves HTTP/1.1; `Some` when the
/// connection was closed for a missed handshake or head deadline.
async fn serve_stream(
    stream: Watched<TcpStream>,
    router: axum::Router,
    tls: Option<Arc<ServerConfig>>,
    ticket: &Ticket,
    guard: Arc<Guard>,
) -> Option<Closed> {
    let limits = guard.limits;
    let (origin, lane) = (Origin(ticket.source), ticket.lane);
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(
        limits.handshake_timeout(),
        stream.get_ref().peek(&mut first),
    )
    .await;
    match peeked {
        Ok(Ok(1)) => {}
        Ok(_) => return None,
        Err(_) => return Some(Closed::Handshake),
    }
    let router = router
        .layer(axum::Extension(origin))
        .layer(axum::Extension(guard));
    // 0x16: a TLS handshake record.
    match (first[0], tls) {
        (0x16, Some(tls)) => {
            let accepted = tokio::time::timeout(
                limits.handshake_timeout(),
                TlsAcceptor::from(tls).accept(stream),
            )
            .await;
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(_)) => return None,
                Err(_) => return Some(Closed::Handshake),
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| Arc::<[u8]>::from(cert.as_ref()));
            // rustls verified it against the CAs the relay trusts.
            if cert.is_some() {
                ticket.authenticated();
            }
            serve_http(stream, router, Peer::Tls(cert), &limits, lane).await
        }
        _ => serve_http(stream, router, Peer::Plain, &limits, lane).await,
    }
}

async fn serve_http<S>(
    stream: S,
    router: axum::Router,
    peer: Peer,
    limits: &HttpLimits,
    lane: Lane,
) -> Option<Closed>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let router = router.layer(axum::Extension(peer));
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout())
        // The reserved lane answers one request per connection.
        .keep_alive(lane == Lane::General);
    match builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        Err(e) if e.is_timeout() => Some(Closed::Header),
        _ => None,
    }
}
