//! The hub's `Watch` call on the wire: the gRPC framing of its answer written here rather than by
//! tonic's encoder, so that a full snapshot is sent from the hub's one copy of the document.
//!
//! tonic encodes each message into a buffer of its own: every stream sent a full snapshot held
//! a copy of the whole document (~300 MB at a million keys) until its client had read it, and
//! a client that reads slowly, or a fleet that all needs a full snapshot at once (a hub
//! restarted at a new revision), took one copy each. Here a `Full` is its message's head, the
//! shared document in slices (each a reference to the one copy, handed on only as HTTP/2 flow
//! control takes them), and its tail. Every other message is small and encoded by prost.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;

use super::proto::{watch_response, WatchRequest, WatchResponse};
use super::server::Hub;

/// The path of the one call the hub serves.
const WATCH: &str = "/keygate.sync.v1.Sync/Watch";

/// The largest `WatchRequest` read (a revision, a name and a digest).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Time a caller has to send its `WatchRequest` once the call is open.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of a document handed to HTTP/2 at once.
const PIECE: usize = 64 * 1024;

/// `keygate.sync.v1.Sync` as a service of tonic's routes.
#[derive(Clone)]
pub struct Service(pub Arc<Hub>);

impl NamedService for Service {
    const NAME: &'static str = "keygate.sync.v1.Sync";
}

impl tower_service::Service<http::Request<Body>> for Service {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let hub = self.0.clone();
        Box::pin(async move {
            Ok(match watch(hub, req).await {
                Ok(resp) => resp,
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Answer one call: check it, read its `WatchRequest`, and stream what [`Hub::watch`] sends.
async fn watch(hub: Arc<Hub>, req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
    if req.uri().path() != WATCH {
        return Err(Status::unimplemented(format!(
            "{} is not a method of keygate.sync.v1.Sync",
            req.uri().path()
        )));
    }
    if req.method() != http::Method::POST {
        return Err(Status::invalid_argument("a gRPC call is a POST"));
    }
    hub.authorized(req.headers())?;
    let peer = req
        .extensions()
        .get::<crate::listen::ClientAddr>()
        .map(|a| a.0);
    let compressed = tokio::time::timeout(REQUEST_TIMEOUT, read_request(req.into_body()))
        .await
        .map_err(|_| Status::deadline_exceeded("the WatchRequest did not arrive in time"))??;
    let rx = hub.watch(peer, compressed)?;
    let mut resp = http::Response::new(Body::new(WatchBody {
        rx,
        parts: VecDeque::new(),
        done: false,
    }));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

/// The call's one message: a gRPC frame (uncompressed: the hub accepts no encoding) of at most
/// [`MAX_REQUEST_BYTES`].
async fn read_request(mut body: Body) -> Result<WatchRequest, Status> {
    let mut buf = BytesMut::new();
    loop {
        if buf.len() >= 5 {
            if buf[0] != 0 {
                return Err(Status::unimplemented(
                    "the hub accepts no compressed message",
                ));
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > MAX_REQUEST_BYTES {
                return Err(Status::resource_exhausted("the WatchRequest is too large"));
            }
            if buf.len() >= 5 + len {
                return WatchRequest::decode(&buf[5..5 + len])
                    .map_err(|_| Status::invalid_argument("the WatchRequest does not decode"));
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > MAX_REQUEST_BYTES + 5 {
                        return Err(Status::resource_exhausted("the WatchRequest is too large"));
                    }
                    buf.put(data);
                }
            }
            Some(Err(_)) => return Err(Status::cancelled("the call broke off")),
            None => return Err(Status::invalid_argument("the call sent no WatchRequest")),
        }
    }
}

/// The answer's body: the stream's messages, gRPC-framed, then the call's status as trailers.
struct WatchBody {
    rx: mpsc::Receiver<Result<WatchResponse, Status>>,
    /// What is left of the message being sent, in order.
    parts: VecDeque<Bytes>,
    done: bool,
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(mut part) = self.parts.pop_front() {
                if part.len() > PIECE {
                    // The rest waits until HTTP/2 asks again, which it does once flow control
                    // has room: a client that reads slowly holds a reference, not a copy.
                    let rest = part.split_off(PIECE);
                    self.parts.push_front(rest);
                }
                if part.is_empty() {
                    continue;
                }
                return Poll::Ready(Some(Ok(Frame::data(part))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            let status = match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Ok(msg)) => match frames(msg) {
                    Ok(parts) => {
                        self.parts = parts;
                        continue;
                    }
                    Err(status) => status,
                },
                Some(Err(status)) => status,
                // A Watch is answered for as long as the hub runs: ended by the hub (shutting
                // down), it is one to call again, not one that completed.
                None => Status::unavailable("the hub ended the stream: call again"),
            };
            self.done = true;
            self.rx.close();
            let mut trailers = HeaderMap::new();
            if status.add_header(&mut trailers).is_err() {
                trailers.insert("grpc-status", HeaderValue::from_static("13"));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
    }
}

/// One message as the gRPC frame (flag, length, protobuf) that carries it. A `Full` is
/// written around its document, which stays the hub's shared copy.
fn frames(msg: WatchResponse) -> Result<VecDeque<Bytes>, Status> {
    let WatchResponse {
        event: Some(watch_response::Event::Full(full)),
        confirmed_age_ms,
    } = msg
    else {
        let len = msg.encoded_len();
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        buf.put_u32(frame_len(len)?);
        msg.encode(&mut buf).expect("room reserved");
        return Ok(VecDeque::from([buf.freeze()]));
    };
    // Full { revision = 1; bytes document = 2 } as field 1 of WatchResponse, then field 4:
    // the fields prost would write, in its order, a default value left out.
    let doc_len = full.document.len();
    let revision_len = if full.revision != 0 {
        1 + encoded_len_varint(full.revision)
    } else {
        0
    };
    let document_len = if doc_len != 0 {
        1 + encoded_len_varint(doc_len as u64) + doc_len
    } else {
        0
    };
    let full_len = revision_len + document_len;
    let age_len = confirmed_age_ms.map_or(0, |age| 1 + encoded_len_varint(age));
    let len = 1 + encoded_len_varint(full_len as u64) + full_len + age_len;
    let mut head = BytesMut::with_capacity(32);
    head.put_u8(0);
    head.put_u32(frame_len(len)?);
    encode_key(1, WireType::LengthDelimited, &mut head);
    encode_varint(full_len as u64, &mut head);
    if full.revision != 0 {
        encode_key(1, WireType::Varint, &mut head);
        encode_varint(full.revision, &mut head);
    }
    if doc_len != 0 {
        encode_key(2, WireType::LengthDelimited, &mut head);
        encode_varint(doc_len as u64, &mut head);
    }
    let mut tail = BytesMut::new();
    if let Some(age) = confirmed_age_ms {
        encode_key(4, WireType::Varint, &mut tail);
        encode_varint(age, &mut tail);
    }
    Ok(VecDeque::from([
        head.freeze(),
        full.document,
        tail.freeze(),
    ]))
}

/// A message's length as its frame states it, within what the hub sends.
fn frame_len(len: usize) -> Result<u32, Status> {
    if len > super::MAX_MESSAGE_BYTES {
        return Err(Status::resource_exhausted(format!(
            "a message of {len} bytes is over the {} bytes a client takes",
            super::MAX_MESSAGE_BYTES
        )));
    }
    Ok(len as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::proto::{Delta, Full, Heartbeat};

    fn framed(msg: &WatchResponse) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
        out.extend_from_slice(&msg.encode_to_vec());
        out
    }

    fn joined(parts: VecDeque<Bytes>) -> Vec<u8> {
        parts.into_iter().flat_map(|b| b.to_vec()).collect()
    }

    /// Every message is written as prost writes it, a `Full` around its shared document.
    #[test]
    fn messages_are_framed_as_prost_encodes_them() {
        let big = Bytes::from(vec![b'x'; 300_000]);
        let cases = [
            (7, big.clone(), Some(1_234)),
            (1, Bytes::from_static(b"{}"), None),
            (0, Bytes::new(), Some(0)),
            (u64::MAX, Bytes::from(vec![b'y'; 127]), Some(u64::MAX)),
            (300, Bytes::from(vec![b'z'; 128]), None),
        ];
        for (revision, document, age) in cases {
            let msg = WatchResponse {
                event: Some(watch_response::Event::Full(Full { revision, document })),
                confirmed_age_ms: age,
            };
            let want = framed(&msg);
            let parts = frames(msg).unwrap();
            assert_eq!(joined(parts), want, "revision {revision}");
        }
        // The document is not copied: the part that carries it is the hub's bytes.
        let parts = frames(WatchResponse {
            event: Some(watch_response::Event::Full(Full {
                revision: 1,
                document: big.clone(),
            })),
            confirmed_age_ms: None,
        })
        .unwrap();
        assert_eq!(parts[1].as_ptr(), big.as_ptr());
        for event in [
            watch_response::Event::Heartbeat(Heartbeat {
                revision: 3,
                interval_ms: 5_000,
            }),
            watch_response::Event::Delta(Delta {
                from_revision: 1,
                revision: 2,
                generated_at: "2026-12-05T00:00:00Z".into(),
                upsert_keys: vec![Bytes::from_static(b"{\"id\":\"k\"}")],
                remove_keys: vec!["gone".into()],
                ..Delta::default()
            }),
        ] {
            let msg = WatchResponse {
                event: Some(event),
                confirmed_age_ms: Some(9),
            };
            assert_eq!(joined(frames(msg.clone()).unwrap()), framed(&msg));
        }
    }

    /// The body hands a document on in pieces, then the call's status.
    #[tokio::test]
    async fn the_body_sends_pieces_then_the_status() {
        let (tx, rx) = mpsc::channel(4);
        let document = Bytes::from(vec![b'd'; 3 * PIECE + 10]);
        let msg = WatchResponse {
            event: Some(watch_response::Event::Full(Full {
                revision: 2,
                document: document.clone(),
            })),
            confirmed_age_ms: Some(5),
        };
        let want = framed(&msg);
        tx.send(Ok(msg)).await.unwrap();
        drop(tx);
        let mut body = WatchBody {
            rx,
            parts: VecDeque::new(),
            done: false,
        };
        let (mut got, mut pieces, mut trailers) = (Vec::new(), 0, None);
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(data) => {
                    assert!(data.len() <= PIECE);
                    got.extend_from_slice(&data);
                    pieces += 1;
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(got, want);
        assert!(pieces >= 5, "{pieces} pieces");
        assert_eq!(trailers.unwrap()["grpc-status"], "14");
    }
}
