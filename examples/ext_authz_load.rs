//! An open-loop, evenly paced gRPC load generator for `bench/ext_authz.sh`: Check latency at a
//! fixed rate, measured the way a Check waits in a mesh.
//!
//! h2load's `--rps` paces each connection with a libev timer, and libev's `epoll` backend
//! sleeps in whole milliseconds: at 50,000 Checks/s over ten connections every tick sends about
//! fifty Checks at once, and a Check's latency is mostly the wait behind its own burst. Envoy's
//! Checks arrive one by one, as requests do. This client sends request `i` at `start + i/rate`
//! exactly (spinning on the clock between sends, never sleeping on a timer), spreads them over
//! `--connections` HTTP/2 connections in turn with at most `--streams` in flight on each, and
//! measures each Check from the time it was *due*, not from when it was sent: if the client or
//! a connection falls behind, the wait counts against the server (no coordinated omission).
//! It also reports how late its own sends were, so a run where the client could not keep pace
//! is visible as such.
//!
//! Every answer must be HTTP 200 with `grpc-status: 0`; anything else is counted and makes the
//! run fail.
//!
//! ```sh
//! cargo build --release --example ext_authz_load
//! target/release/examples/ext_authz_load --addr 127.0.0.1:PORT --body body.bin \
//!     --rate 50000 --requests 200000 --connections 10 --streams 10
//! ```
//! Prints one line: `rate <asked> <achieved> ok <n> failed <n> p50 <ms> p90 <ms> p99 <ms>
//! p99.9 <ms> max <ms> late-p99 <ms>`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

mod support;

#[derive(Parser)]
struct Args {
    /// The gRPC server.
    #[arg(long)]
    addr: SocketAddr,
    /// A gRPC-framed request message (flag byte, 4-byte length, message).
    #[arg(long)]
    body: std::path::PathBuf,
    /// Checks per second, over all connections.
    #[arg(long)]
    rate: f64,
    /// Checks measured.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Checks sent at the same rate before measuring, not counted.
    #[arg(long, default_value_t = 20_000)]
    warmup: u64,
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Streams in flight per connection at most; a Check due while all are busy waits.
    #[arg(long, default_value_t = 10)]
    streams: usize,
    #[arg(long, default_value = "/envoy.service.auth.v3.Authorization/Check")]
    path: String,
}

struct Connection {
    send: h2::client::SendRequest<Bytes>,
    slots: Arc<Semaphore>,
}

#[derive(Default)]
struct Tally {
    /// Nanoseconds from a Check's due time to its last frame, measured Checks only.
    latency: Vec<u64>,
    /// Nanoseconds from a Check's due time to the moment it was handed to its connection.
    lateness: Vec<u64>,
    failed: u64,
    first_failure: Option<String>,
}

fn main() {
    let args = Args::parse();
    let body = Bytes::from(std::fs::read(&args.body).expect("the request body file"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let code = runtime.block_on(run(args, body));
    std::process::exit(code);
}

async fn run(args: Args, body: Bytes) -> i32 {
    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let tcp = TcpStream::connect(args.addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        connections.push(Connection {
            send,
            slots: Arc::new(Semaphore::new(args.streams)),
        });
    }
    let uri: http::Uri = format!("http://{}{}", args.addr, args.path)
        .parse()
        .expect("a URI");
    // Room for every figure up front: a vector doubling mid-run would stall the client.
    let tally = Arc::new(Mutex::new(Tally {
        latency: Vec::with_capacity(args.requests as usize),
        lateness: Vec::with_capacity(args.requests as usize),
        ..Tally::default()
    }));
    let total = args.warmup + args.requests;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut tasks = Vec::with_capacity(total as usize);
    let start = Instant::now();
    let mut measured_start = start;
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        while Instant::now() < due {
            // Lets the connections read their answers while the next send is not due yet.
            tokio::task::yield_now().await;
        }
        if i == args.warmup {
            measured_start = due;
        }
        let connection = &connections[i as usize % connections.len()];
        let request = http::Request::post(uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("a request");
        tasks.push(tokio::spawn(check(
            connection.send.clone(),
            connection.slots.clone(),
            request,
            body.clone(),
            due,
            i >= args.warmup,
            tally.clone(),
        )));
    }
    for task in tasks {
        task.await.expect("a Check task");
    }
    let elapsed = measured_start.elapsed().as_secs_f64();
    let mut tally = Arc::try_unwrap(tally)
        .ok()
        .expect("every task is done")
        .into_inner()
        .expect("the tally");
    tally.latency.sort_unstable();
    tally.lateness.sort_unstable();
    println!(
        "{} late-p99 {:.3}",
        support::summary(
            args.rate,
            args.requests as f64 / elapsed,
            tally.failed,
            &tally.latency
        ),
        support::quantile_ms(&tally.lateness, 0.99),
    );
    if let Some(failure) = tally.first_failure {
        eprintln!("first failure: {failure}");
    }
    i32::from(tally.failed > 0)
}

async fn check(
    mut send: h2::client::SendRequest<Bytes>,
    slots: Arc<Semaphore>,
    request: http::Request<()>,
    body: Bytes,
    due: Instant,
    measured: bool,
    tally: Arc<Mutex<Tally>>,
) {
    let slot = slots
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let sent = Instant::now();
    let outcome = exchange(&mut send, request, body).await;
    let done = Instant::now();
    drop(slot);
    let mut tally = tally.lock().expect("the tally");
    match outcome {
        Ok(()) if measured => {
            tally.latency.push((done - due).as_nanos() as u64);
            tally.lateness.push((sent - due).as_nanos() as u64);
        }
        Ok(()) => {}
        Err(failure) => {
            tally.failed += 1;
            tally.first_failure.get_or_insert(failure);
        }
    }
}

/// One Check: the request, its whole answer, and the verdict that it is a gRPC success.
async fn exchange(
    send: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    body: Bytes,
) -> Result<(), String> {
    let ready = std::future::poll_fn(|cx| send.poll_ready(cx));
    ready.await.map_err(|e| e.to_string())?;
    let (answer, mut stream) = send
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    stream.send_data(body, true).map_err(|e| e.to_string())?;
    let answer = answer.await.map_err(|e| e.to_string())?;
    let (head, mut body) = answer.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(format!("HTTP status {}", head.status));
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| head.headers.get("grpc-status"));
    match status.map(|s| s.as_bytes()) {
        Some(b"0") => Ok(()),
        other => Err(format!("grpc-status {other:?}")),
    }
}
