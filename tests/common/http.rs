//! Plain HTTP/1.1 over raw sockets, for the HTTP port's hostile-client tests: a one-shot
//! request from a chosen source address (any 127.0.0.0/8 address is this host, so one test
//! can be many sources), and a slow reader that pipelines requests and never reads.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpSocket, TcpStream};

/// 127.0.0.`last`.
pub fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A TCP connection from `from` (port chosen by the kernel) to `to`, with a small receive
/// buffer so that a reader that never reads blocks the server's writes early.
pub async fn connect_from(
    from: IpAddr,
    to: SocketAddr,
    recv_buffer: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(bytes) = recv_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// One `GET path` from `from` with `Connection: close`: the status and the body, or why
/// not within `within`.
pub async fn get_from(
    from: IpAddr,
    to: SocketAddr,
    path: &str,
    within: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = connect_from(from, to, None)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {:?}", &text[..text.len().min(80)]))?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_string());
        Ok((status, body))
    };
    tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| format!("GET {path} from {from}: no answer within {within:?}"))?
}

/// A client that pipelines requests and never reads (see [`slow_reader`]); dropping it
/// closes its connection.
pub struct SlowReader {
    pub read: OwnedReadHalf,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for SlowReader {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// A client that pipelines `requests` × `GET path` and never reads: the server's answers
/// pile up in the socket until its writes block, and then the client's writes block as well
/// (a task goes on writing). `None` if the connection was refused.
pub async fn slow_reader(
    from: IpAddr,
    to: SocketAddr,
    path: &str,
    requests: usize,
) -> Option<SlowReader> {
    let stream = connect_from(from, to, Some(4096)).await.ok()?;
    let (read, mut write) = stream.into_split();
    let request = format!("GET {path} HTTP/1.1\r\nhost: relay\r\n\r\n").repeat(requests);
    let writer = tokio::spawn(async move {
        let _ = write.write_all(request.as_bytes()).await;
        // Hold the connection open (dropping the write half would send a FIN).
        std::future::pending::<()>().await;
        drop(write);
    });
    Some(SlowReader { read, writer })
}

/// Whether the server has closed `stream` (reading what it sent until EOF or a reset),
/// waiting at most `within`.
pub async fn closed_by_server(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let drain = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, drain).await.is_ok()
}
