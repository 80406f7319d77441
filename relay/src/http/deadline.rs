//! The HTTP port's write and idle deadlines. [`Watched`] wraps a connection's TCP stream
//! (under TLS, so bytes waiting inside rustls count as well) and records in an [`Activity`]
//! when bytes last moved and since when a write has been waiting on the socket; [`watch`]
//! is the connection's watchdog, which the listener races against the connection: when it
//! returns, the connection is dropped (closed). hyper's own timer bounds the request head;
//! these bound what hyper cannot see: a client that never reads, and a silent one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Why a connection was closed by its watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Bytes waited on the socket for longer than the write deadline.
    Write,
    /// No byte moved either way for the idle deadline.
    Idle,
}

/// When a connection's bytes last moved. Times are milliseconds since `start`, plus one, so
/// that 0 can mean "not waiting".
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    moved_ms: AtomicU64,
    write_waiting_since_ms: AtomicU64,
}

impl Activity {
    pub fn new(now: Instant) -> Activity {
        Activity {
            start: now,
            moved_ms: AtomicU64::new(1),
            write_waiting_since_ms: AtomicU64::new(0),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.start).as_millis();
        u64::try_from(since).unwrap_or(u64::MAX - 1) + 1
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms - 1)
    }

    fn moved(&self, now: Instant) {
        self.moved_ms.store(self.ms(now), Ordering::Relaxed);
    }

    fn write_waits(&self, now: Instant) {
        let ms = self.ms(now);
        let _ = self.write_waiting_since_ms.compare_exchange(
            0,
            ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn write_drained(&self) {
        self.write_waiting_since_ms.store(0, Ordering::Relaxed);
    }

    /// `Err` once a deadline has passed, else when to look again.
    pub fn check(&self, now: Instant, write: Duration, idle: Duration) -> Result<Instant, Expired> {
        let idle_at = self.at(self.moved_ms.load(Ordering::Relaxed)) + idle;
        let write_at = match self.write_waiting_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(self.at(since) + write),
        };
        if write_at.is_some_and(|at| now >= at) {
            return Err(Expired::Write);
        }
        if now >= idle_at {
            return Err(Expired::Idle);
        }
        Ok(write_at.map_or(idle_at, |at| at.min(idle_at)))
    }
}

/// Returns when the connection has missed a deadline.
pub async fn watch(activity: &Activity, write: Duration, idle: Duration) -> Expired {
    loop {
        match activity.check(Instant::now(), write, idle) {
            Err(expired) => return expired,
            // A write that starts waiting after this sleep began is seen at the next look:
            // at worst one idle period late. Cap the sleep at the write deadline so it is not.
            Ok(next) => {
                let cap = Instant::now() + write;
                tokio::time::sleep_until(next.min(cap).into()).await;
            }
        }
    }
}

/// A stream that reports its progress to an [`Activity`].
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { inner, activity }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.moved(Instant::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    fn note<T>(&self, polled: &Poll<io::Result<T>>, progress: impl Fn(&T) -> bool) {
        match polled {
            Poll::Pending => self.activity.write_waits(Instant::now()),
            Poll::Ready(Ok(value)) if progress(value) => self.activity.moved(Instant::now()),
            Poll::Ready(_) => {}
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&polled, |n| *n > 0);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&polled, |n| *n > 0);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// The writer flushes once everything it had is written: nothing waits any more.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(&polled, |_| false);
        if matches!(polled, Poll::Ready(Ok(()))) {
            self.activity.write_drained();
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(&polled, |_| false);
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: Duration = Duration::from_millis(100);
    const IDLE: Duration = Duration::from_millis(1000);

    #[test]
    fn idle_counts_from_the_last_byte_and_a_waiting_write_from_its_first_wait() {
        let t0 = Instant::now();
        let a = Activity::new(t0);
        assert_eq!(a.check(t0, WRITE, IDLE), Ok(t0 + IDLE));
        let t1 = t0 + Duration::from_millis(500);
        a.moved(t1);
        assert_eq!(a.check(t1, WRITE, IDLE), Ok(t1 + IDLE));
        a.write_waits(t1);
        // Bytes taken since do not end the wait; only a drained writer does.
        a.write_waits(t1 + Duration::from_millis(50));
        a.moved(t1 + Duration::from_millis(50));
        assert_eq!(a.check(t1, WRITE, IDLE), Ok(t1 + WRITE));
        assert_eq!(a.check(t1 + WRITE, WRITE, IDLE), Err(Expired::Write));
        a.write_drained();
        assert!(a.check(t1 + WRITE, WRITE, IDLE).is_ok());
        let late = t1 + Duration::from_millis(50) + IDLE;
        assert_eq!(a.check(late, WRITE, IDLE), Err(Expired::Idle));
    }
}
