//! The accept loop every HTTP front shares: the next connection, or `None` once shutdown begins.
//! Accept errors (out of file descriptors and the like) are logged and retried after a short
//! pause instead of spinning. A connection past the front's `limits.max_connections` is reset
//! at once, so the client learns immediately instead of waiting in a queue.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::telemetry::{ConnectionGuard, Connections};

pub async fn next_connection<F: Future<Output = ()>>(
    listener: &TcpListener,
    mut shutdown: Pin<&mut F>,
    front: &'static str,
    connections: &Arc<Connections>,
) -> Option<(TcpStream, SocketAddr, ConnectionGuard)> {
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(guard) = connections.admit() else {
                        tracing::debug!(front, %peer, "connection refused: limits.max_connections reached");
                        // An RST rather than a FIN: nothing was read, nothing will be answered.
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer, guard));
                }
                Err(e) => {
                    tracing::warn!(error = %e, front, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A connection that holds its place among the front's `limits.max_connections` until dropped.
pub struct Counted<S> {
    inner: S,
    _open: ConnectionGuard,
}

impl<S> Counted<S> {
    pub fn new(inner: S, open: ConnectionGuard) -> Self {
        Counted { inner, _open: open }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Counted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Connections accepted on `listener` for a tonic server, each counted against `connections`
/// (past the limit they are reset, as on the other fronts). Ends, closing the listener, when
/// the stream is dropped.
pub fn counted_incoming(
    listener: TcpListener,
    connections: Arc<Connections>,
    front: &'static str,
) -> ReceiverStream<std::io::Result<Counted<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let closed = tx.clone();
        let closed = closed.closed();
        tokio::pin!(closed);
        while let Some((stream, _, open)) =
            next_connection(&listener, closed.as_mut(), front, &connections).await
        {
            if tx.send(Ok(Counted::new(stream, open))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
