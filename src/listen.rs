//! The accept loop every HTTP front shares: the next connection, or `None` once shutdown begins.
//! Accept errors (out of file descriptors and the like) are logged and retried after a short
//! pause instead of spinning. A connection past the front's `limits.max_connections` is reset
//! at once, so the client learns immediately instead of waiting in a queue.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

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
