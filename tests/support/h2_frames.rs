//! A bare HTTP/2 client that shows every frame the server sends, for what `h2`'s client hides:
//! whether a connection ended with a GOAWAY or was just dropped, and what happens to a stream
//! sent while the server is saying goodbye. Requests are HPACK-encoded as literals without
//! indexing (no Huffman, no dynamic table), which every decoder must accept; the server's
//! header blocks are not decoded.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's last stream id and error code.
    pub fn goaway(&self) -> (u32, u32) {
        assert_eq!(self.kind, GOAWAY, "{self:?}");
        let p = &self.payload;
        (
            u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
            u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        )
    }
}

pub struct RawH2 {
    tcp: TcpStream,
    read: Vec<u8>,
    /// The payload of the last PING from the server, not answered (only `goodbye` answers).
    pub ping: Option<Vec<u8>>,
}

impl RawH2 {
    /// Connects, sends the preface and empty SETTINGS, and acknowledges the server's SETTINGS.
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut h2 = RawH2 {
            tcp,
            read: Vec::new(),
            ping: None,
        };
        h2.send(SETTINGS, 0, 0, &[]).await;
        loop {
            let f = h2
                .next(Duration::from_secs(5))
                .await
                .expect("the server's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                h2.send(SETTINGS, ACK, 0, &[]).await;
                return h2;
            }
        }
    }

    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// A request's HEADERS frame (one block, END_HEADERS), ending the stream if `end`.
    pub async fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end: bool) {
        let mut block = Vec::new();
        for (name, value) in fields {
            block.push(0x00);
            string(&mut block, name.as_bytes());
            string(&mut block, value.as_bytes());
        }
        let flags = END_HEADERS | if end { END_STREAM } else { 0 };
        self.send(HEADERS, flags, stream, &block).await;
    }

    /// A whole `GET` of `path` on `stream` with `key` as its `x-api-key`, over plain HTTP.
    pub async fn get(&mut self, stream: u32, authority: &str, path: &str, key: &str) {
        let fields = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
            ("x-api-key", key),
        ];
        self.headers(stream, &fields, true).await;
    }

    /// The next frame, or `None` once the server has closed the connection. Panics if nothing
    /// comes within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.read.len() >= 9 {
                let len =
                    u32::from_be_bytes([0, self.read[0], self.read[1], self.read[2]]) as usize;
                if self.read.len() >= 9 + len {
                    let head: Vec<u8> = self.read.drain(..9).collect();
                    let payload: Vec<u8> = self.read.drain(..len).collect();
                    if head[3] == PING && head[4] & ACK == 0 {
                        self.ping = Some(payload.clone());
                    }
                    return Some(Frame {
                        kind: head[3],
                        flags: head[4],
                        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]])
                            & 0x7fff_ffff,
                        payload,
                    });
                }
            }
            let mut buf = [0u8; 16384];
            let n = tokio::time::timeout_at(deadline, self.tcp.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no frame from the server within {within:?}"));
            match n {
                Ok(0) | Err(_) => {
                    assert!(self.read.is_empty(), "the connection ended inside a frame");
                    return None;
                }
                Ok(n) => self.read.extend_from_slice(&buf[..n]),
            }
        }
    }
}

impl RawH2 {
    /// Reads up to the server's first GOAWAY (panics on a close without one).
    pub async fn first_goaway(&mut self, within: Duration) -> Frame {
        loop {
            let f = self.next(within).await.expect("a GOAWAY, not a bare close");
            if f.kind == GOAWAY {
                return f;
            }
            assert_ne!(f.kind, RST_STREAM, "{f:?}");
        }
    }

    /// The goodbye of a connection left unused since `used`: its first GOAWAY, within `within`
    /// and not before `at_least` has passed, naming no stream yet (those that cross it are
    /// still served).
    pub async fn idle_goodbye(
        &mut self,
        used: std::time::Instant,
        at_least: Duration,
        within: Duration,
    ) -> Frame {
        let first = self.first_goaway(within).await;
        assert!(used.elapsed() >= at_least, "{:?}", used.elapsed());
        assert_eq!(
            first.goaway(),
            (0x7fff_ffff, 0),
            "the first GOAWAY refuses nothing yet"
        );
        first
    }

    /// Reads up to the HEADERS that begin `stream`'s answer (panics if the stream is reset
    /// instead): the frames that came before it.
    pub async fn response_head(&mut self, stream: u32) -> Vec<Frame> {
        let mut before = Vec::new();
        loop {
            let f = self
                .next(Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("closed before stream {stream}'s answer"));
            assert!(
                !(f.kind == RST_STREAM && f.stream == stream),
                "stream {stream} was reset: {f:?}"
            );
            if f.kind == HEADERS && f.stream == stream {
                return before;
            }
            before.push(f);
        }
    }

    /// Whether `stream` was answered 200: reads to its HEADERS (false if the stream is reset
    /// instead). The server encodes `:status 200` as HPACK's static entry 8 (one byte, 0x88);
    /// any other status is another byte.
    pub async fn answered_200(&mut self, stream: u32) -> bool {
        loop {
            let f = self
                .next(Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("closed before stream {stream}'s answer"));
            if f.stream != stream {
                continue;
            }
            match f.kind {
                RST_STREAM => return false,
                HEADERS => return f.payload.first() == Some(&0x88),
                _ => {}
            }
        }
    }

    /// Answers the PING that came with the server's goodbye, then reads to the close: the last
    /// GOAWAY's last stream id and error code.
    pub async fn goodbye(&mut self) -> Option<(u32, u32)> {
        while self.ping.is_none() {
            self.next(Duration::from_secs(5))
                .await
                .expect("the goodbye's PING");
        }
        let ping = self.ping.take().unwrap();
        self.send(PING, ACK, 0, &ping).await;
        let mut last = None;
        while let Some(f) = self.next(Duration::from_secs(5)).await {
            if f.kind == GOAWAY {
                last = Some(f.goaway());
            }
        }
        last
    }
}

/// An HPACK string literal without Huffman coding: a 7-bit-prefix length, then the bytes.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}
