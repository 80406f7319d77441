//! The HTTP port: `GET /metrics` (Prometheus text) and `GET /healthz`. Read-only and tiny, so
//! it is served by a few lines over tokio on its own thread, off the data plane's cores; the
//! control-plane API (with mutual TLS) will bring a full HTTP stack (axum) to this port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// The largest request head accepted.
const REQUEST_BYTES_MAX: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Debug)]
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(addr: SocketAddr, render: Render) -> Result<HttpServer, String> {
        let std_listener =
            std::net::TcpListener::bind(addr).map_err(|e| format!("http_listen {addr}: {e}"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let addr = std_listener.local_addr().map_err(|e| e.to_string())?;
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("relay-http".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => return tracing::error!("http runtime: {e}"),
                };
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else { return };
                    loop {
                        tokio::select! {
                            accepted = listener.accept() => if let Ok((stream, _)) = accepted {
                                let render = render.clone();
                                tokio::spawn(async move {
                                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, render)).await;
                                });
                            },
                            _ = &mut stop_rx => return,
                        }
                    }
                });
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

async fn respond(mut stream: TcpStream, render: Render) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..read]);
        if head.len() > REQUEST_BYTES_MAX {
            return reply(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    match (method, path, version) {
        (Some(b"GET"), Some(b"/metrics"), Some(v)) if v.starts_with(b"HTTP/1.") => {
            let body = render();
            reply(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        (Some(b"GET"), Some(b"/healthz"), Some(v)) if v.starts_with(b"HTTP/1.") => {
            reply(&mut stream, "200 OK", "text/plain", "ok\n").await
        }
        (Some(_), Some(b"/metrics" | b"/healthz"), Some(v)) if v.starts_with(b"HTTP/1.") => {
            reply(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await
        }
        (Some(_), Some(_), Some(v)) if v.starts_with(b"HTTP/1.") => {
            reply(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found; try /metrics\n",
            )
            .await
        }
        _ => {
            reply(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                "malformed request line\n",
            )
            .await
        }
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
