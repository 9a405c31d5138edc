//! A test control plane: a raw HTTP/1.1 server on 127.0.0.1:0 speaking the documented snapshot
//! endpoint contract (GET, ETag / If-None-Match → 304, optional bearer token), and failing on
//! demand in every way a real one can: error statuses, slow answers, truncated JSON, a body cut
//! off mid-transfer, an oversized body, a revision going backwards, a reset connection. Written
//! on raw TCP so each failure is exactly the bytes on the wire. Optionally behind TLS.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the control plane does with the next requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// 200 with the document and its ETag, or 304 when If-None-Match matches.
    Serve,
    /// Answer this status with a small JSON body.
    Status(u16),
    /// Wait this long, then serve.
    Slow(Duration),
    /// A complete HTTP answer whose JSON stops halfway.
    TruncatedJson,
    /// Announce the whole body's length, send half of it, close.
    CutOff,
    /// A chunked body of this many bytes (no Content-Length).
    Huge(usize),
    /// Close the connection with a TCP reset before answering.
    Reset,
}

/// One request the control plane received.
#[derive(Debug, Clone)]
pub struct CpRequest {
    pub if_none_match: Option<String>,
    pub authorization: Option<String>,
}

struct State {
    doc: String,
    etag: String,
    behaviour: Behaviour,
    token: Option<String>,
    requests: Vec<CpRequest>,
}

pub struct ControlPlane {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tls: bool,
}

fn etag_of(doc: &str) -> String {
    format!("\"{}\"", &super::digest(doc)[7..23])
}

impl ControlPlane {
    pub async fn start(doc: &str) -> Self {
        Self::start_inner(doc, None).await
    }

    /// The same, behind TLS with `acceptor`.
    pub async fn start_tls(doc: &str, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        Self::start_inner(doc, Some(acceptor)).await
    }

    async fn start_inner(doc: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            doc: doc.to_owned(),
            etag: etag_of(doc),
            behaviour: Behaviour::Serve,
            token: None,
            requests: Vec::new(),
        }));
        let shared = state.clone();
        let is_tls = tls.is_some();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let reset = state.lock().unwrap().behaviour == Behaviour::Reset;
                    if reset {
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                        state.lock().unwrap().requests.push(CpRequest {
                            if_none_match: None,
                            authorization: None,
                        });
                        return;
                    }
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                answer(s, state).await;
                            }
                        }
                        None => answer(stream, state).await,
                    }
                });
            }
        });
        Self {
            addr,
            state,
            tls: is_tls,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/v1/snapshot", self.addr)
    }

    /// Serve `doc` from now on (a new ETag).
    pub fn set_doc(&self, doc: &str) {
        let mut s = self.state.lock().unwrap();
        s.doc = doc.to_owned();
        s.etag = etag_of(doc);
    }

    pub fn set(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().behaviour = behaviour;
    }

    /// Refuse requests without `Authorization: Bearer <token>` (401).
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().token = Some(token.to_owned());
    }

    pub fn requests(&self) -> Vec<CpRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn etag(&self) -> String {
        self.state.lock().unwrap().etag.clone()
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let req = CpRequest {
        if_none_match: header("if-none-match"),
        authorization: header("authorization"),
    };
    let (doc, etag, behaviour, token) = {
        let mut s = state.lock().unwrap();
        s.requests.push(req.clone());
        (
            s.doc.clone(),
            s.etag.clone(),
            s.behaviour.clone(),
            s.token.clone(),
        )
    };
    if let Behaviour::Slow(d) = behaviour {
        tokio::time::sleep(d).await;
    }
    if let Some(token) = token {
        if req.authorization.as_deref() != Some(&format!("Bearer {token}")) {
            let body = r#"{"error":"unauthorized"}"#;
            let _ = stream
                .write_all(
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            let _ = stream.shutdown().await;
            return;
        }
    }
    let out: Vec<u8> = match behaviour {
        Behaviour::Serve | Behaviour::Slow(_) => {
            if req.if_none_match.as_deref() == Some(&etag) {
                format!("HTTP/1.1 304 Not Modified\r\netag: {etag}\r\nconnection: close\r\n\r\n")
                    .into_bytes()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: {etag}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
                    doc.len()
                )
                .into_bytes()
            }
        }
        Behaviour::Status(code) => {
            let body = r#"{"error":"control plane trouble"}"#;
            format!(
                "HTTP/1.1 {code} Trouble\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
        Behaviour::TruncatedJson => {
            let half = &doc[..doc.len() / 2];
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: \"half\"\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{half}",
                half.len()
            )
            .into_bytes()
        }
        Behaviour::CutOff => format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            doc.len(),
            &doc[..doc.len() / 2]
        )
        .into_bytes(),
        Behaviour::Huge(n) => {
            let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
            let piece = vec![b' '; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(piece.len());
                out.extend_from_slice(format!("{k:x}\r\n").as_bytes());
                out.extend_from_slice(&piece[..k]);
                out.extend_from_slice(b"\r\n");
                left -= k;
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
        Behaviour::Reset => unreachable!("handled at accept"),
    };
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}
