//! The HTTP port: `/metrics` and `/healthz` in plain HTTP (what a Prometheus scraper and a
//! load balancer speak), and the control API (`/v1/...`) over TLS 1.3 with the same client
//! certificates as the data plane. Both on one port: the first byte of a connection tells a
//! TLS ClientHello (0x16) from a plain request, so operators keep one address and scrapers
//! need no certificate. Served by axum over hyper on a small tokio runtime of its own, off
//! the data plane's cores; control-plane work (store commits) runs on its blocking pool.

pub mod api;
pub mod context;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

pub use self::context::{HttpContext, Peer, Render};

/// How long a connection may take to send its first byte and finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; past it new ones wait in the kernel's backlog.
const CONNECTIONS_MAX: usize = 1024;

#[derive(Debug)]
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(addr: SocketAddr, context: HttpContext) -> Result<HttpServer, String> {
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

async fn serve(
    std_listener: std::net::TcpListener,
    context: HttpContext,
    mut stop: oneshot::Receiver<()>,
) {
    let Ok(listener) = TcpListener::from_std(std_listener) else {
        return;
    };
    if let Some(control) = context.control.clone() {
        tokio::spawn(api::run_background(control));
    }
    let router = api::router(context.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let router = router.clone();
                let tls = context.tls.clone();
                tokio::spawn(async move {
                    serve_connection(stream, router, tls).await;
                    drop(permit);
                });
            }
            _ = &mut stop => return,
        }
    }
}

async fn serve_connection(stream: TcpStream, router: axum::Router, tls: Option<Arc<ServerConfig>>) {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) {
        return;
    }
    // 0x16: a TLS handshake record.
    match (first[0], tls) {
        (0x16, Some(tls)) => {
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(tls).accept(stream))
                    .await;
            let Ok(Ok(stream)) = accepted else { return };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| Arc::<[u8]>::from(cert.as_ref()));
            serve_http(stream, router, Peer::Tls(cert)).await;
        }
        _ => serve_http(stream, router, Peer::Plain).await,
    }
}

async fn serve_http<S>(stream: S, router: axum::Router, peer: Peer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let router = router.layer(axum::Extension(peer));
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}
