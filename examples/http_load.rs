//! An open-loop, evenly paced HTTP/1.1 load generator for `bench/load.sh` (`RATE=…`): a proxy's
//! latency at a fixed request rate, measured from when each request was *due*.
//!
//! wrk is closed-loop: each of its connections sends the next request only when the last one is
//! answered, so at saturation its p99 mostly says how fairly a server shares out its one core
//! among fifty waiting connections, and a stall delays the requests that would have been sent
//! during it without counting them (coordinated omission). Here request `i` is due at
//! `start + i/rate` whatever happened before it; a request due while every connection is busy
//! waits for one, and that wait counts against the server.
//!
//! The pacing thread sleeps until each request is due (it never spins: the upstream shares this
//! core in the benchmark, and a spinning client would take the core from it); the kernel's timer
//! slack wakes it up to ~60 µs late, so requests leave in twos and threes at 50,000/s. How late
//! the pacer itself handed requests over is reported (`pace-p99`), so a run whose client could
//! not keep pace shows as such; `wait-p99` is how long a request then waited to be written,
//! mostly for a free connection (every one busy: the server is behind).
//!
//! A request unanswered after 2 s counts as failed (as wrk's timeout), and its connection is
//! made again.
//!
//! With several `--addr`, requests go to them in turn (request `i` to server `i mod n`), each
//! server with its own `--connections`, and each gets its own line: two proxies measured this
//! way meet the same moments of the machine. On a VM whose every core stops for a few
//! milliseconds about once a second (BENCHMARKS.md §2), one run after another puts each proxy's
//! p99 at the mercy of how many of those pauses its own run met; interleaved, both meet the same.
//!
//! Every answer must be a 200 with a `Content-Length` body; anything else is counted and makes
//! the run fail.
//!
//! ```sh
//! cargo build --release --example http_load
//! target/release/examples/http_load --addr 127.0.0.1:PORT --path /v1/analyses/1 \
//!     --header 'X-API-Key: sk_live_…' --rate 40000 --requests 400000 --connections 50
//! ```
//! Prints one line per server, in the order given: `rate <asked> <achieved> ok <n> failed <n>
//! p50 <ms> p90 <ms> p99 <ms> p99.9 <ms> max <ms> wait-p99 <ms> pace-p99 <ms>` (the rate each
//! server got; `pace-p99` is the pacer's, the same on every line).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

mod support;

#[derive(Parser)]
struct Args {
    /// The server; repeatable: requests go to each in turn.
    #[arg(long = "addr", required = true)]
    addrs: Vec<SocketAddr>,
    #[arg(long, default_value = "/")]
    path: String,
    /// A request header, `Name: value`; repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Requests per second, over all servers and connections.
    #[arg(long)]
    rate: f64,
    /// Requests measured, over all servers.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Requests sent at the same rate before measuring, not counted.
    #[arg(long, default_value_t = 20_000)]
    warmup: u64,
    /// Keep-alive connections to each server, one request in flight on each.
    #[arg(long, default_value_t = 50)]
    connections: usize,
}

/// How long a request may go unanswered before it counts as failed (wrk's default timeout).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// One request to send: its number and when it was due.
struct Due {
    index: u64,
    at: Instant,
}

#[derive(Default)]
struct Tally {
    /// Nanoseconds from a request's due time to the end of its answer, measured requests only.
    latency: Vec<u64>,
    /// Nanoseconds from a request's due time to its write.
    waited: Vec<u64>,
    /// When the last measured answer ended.
    last: Option<Instant>,
    failed: u64,
    first_failure: Option<String>,
}

fn main() {
    let args = Args::parse();
    assert!(
        args.rate > 0.0 && args.connections > 0,
        "--rate and --connections must be positive"
    );
    for header in &args.headers {
        assert!(
            header.contains(':'),
            "--header {header:?}: expected `Name: value`"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let code = runtime.block_on(run(args));
    std::process::exit(code);
}

/// What one server is sent and what it answered.
struct Target {
    send: mpsc::UnboundedSender<Due>,
    tally: Arc<Mutex<Tally>>,
}

async fn run(args: Args) -> i32 {
    let servers = args.addrs.len() as u64;
    let mut targets = Vec::with_capacity(args.addrs.len());
    let mut workers = Vec::new();
    for &addr in &args.addrs {
        let mut request = format!("GET {} HTTP/1.1\r\nHost: {addr}\r\n", args.path);
        for header in &args.headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        let request: Arc<[u8]> = Arc::from(request.into_bytes());
        // Room for every figure up front: a vector doubling mid-run would stall the client.
        let share = (args.requests / servers + 1) as usize;
        let tally = Arc::new(Mutex::new(Tally {
            latency: Vec::with_capacity(share),
            waited: Vec::with_capacity(share),
            ..Tally::default()
        }));
        let (send, receive) = mpsc::unbounded_channel::<Due>();
        let receive = Arc::new(tokio::sync::Mutex::new(receive));
        for _ in 0..args.connections {
            let stream = connect(addr).await.expect("connect");
            workers.push(tokio::spawn(worker(
                stream,
                addr,
                request.clone(),
                receive.clone(),
                args.warmup,
                tally.clone(),
            )));
        }
        targets.push(Target { send, tally });
    }
    let (sends, tallies): (Vec<_>, Vec<_>) = targets.into_iter().map(|t| (t.send, t.tally)).unzip();

    let total = args.warmup + args.requests;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now() + Duration::from_millis(10);
    let measured_start = start + interval.mul_f64(args.warmup as f64);
    // Sleeping, not spinning: see the module's comment. A server none of whose connections is
    // left (each failed to connect again) is sent nothing more; the others go on.
    let pacer = std::thread::spawn(move || {
        let mut sends: Vec<_> = sends.into_iter().map(Some).collect();
        let mut late = Vec::with_capacity(args.requests as usize);
        for index in 0..total {
            let at = start + interval.mul_f64(index as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if index >= args.warmup {
                late.push(Instant::now().saturating_duration_since(at).as_nanos() as u64);
            }
            let slot = &mut sends[(index % servers) as usize];
            if slot
                .as_ref()
                .is_some_and(|s| s.send(Due { index, at }).is_err())
            {
                *slot = None;
            }
        }
        late
    });
    for worker in workers {
        worker.await.expect("a connection task");
    }
    let mut pace = pacer.join().expect("the pacing thread");
    pace.sort_unstable();
    let pace_p99 = support::quantile_ms(&pace, 0.99);
    let mut failed = false;
    for tally in tallies {
        let tally = Arc::try_unwrap(tally)
            .ok()
            .expect("every task is done")
            .into_inner()
            .expect("the tally");
        failed |= report(tally, args.rate / servers as f64, measured_start, pace_p99);
    }
    i32::from(failed)
}

/// Prints one server's line; true if any of its requests failed.
fn report(mut tally: Tally, rate: f64, measured_start: Instant, pace_p99: f64) -> bool {
    let elapsed = tally
        .last
        .map_or(f64::NAN, |last| (last - measured_start).as_secs_f64());
    tally.latency.sort_unstable();
    tally.waited.sort_unstable();
    let achieved = tally.latency.len() as f64 / elapsed;
    println!(
        "{} wait-p99 {:.3} pace-p99 {pace_p99:.3}",
        support::summary(rate, achieved, tally.failed, &tally.latency),
        support::quantile_ms(&tally.waited, 0.99),
    );
    if let Some(failure) = tally.first_failure {
        eprintln!("first failure: {failure}");
    }
    tally.failed > 0
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One keep-alive connection: takes the next due request whenever it is free.
async fn worker(
    mut stream: TcpStream,
    addr: SocketAddr,
    request: Arc<[u8]>,
    receive: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Due>>>,
    warmup: u64,
    tally: Arc<Mutex<Tally>>,
) {
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let Some(due) = receive.lock().await.recv().await else {
            return;
        };
        let sent = Instant::now();
        let outcome =
            tokio::time::timeout(ANSWER_TIMEOUT, exchange(&mut stream, &request, &mut buffer))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {ANSWER_TIMEOUT:?}")));
        let done = Instant::now();
        let failed = {
            let mut tally = tally.lock().expect("the tally");
            match outcome {
                Ok(()) if due.index >= warmup => {
                    tally.latency.push((done - due.at).as_nanos() as u64);
                    tally.waited.push((sent - due.at).as_nanos() as u64);
                    tally.last = Some(tally.last.map_or(done, |last| last.max(done)));
                    false
                }
                Ok(()) => false,
                Err(failure) => {
                    tally.failed += 1;
                    tally.first_failure.get_or_insert(failure);
                    true
                }
            }
        };
        if failed {
            match connect(addr).await {
                Ok(fresh) => stream = fresh,
                Err(_) => return,
            }
        }
    }
}

/// One request and its whole answer, which must be a 200 with a `Content-Length` body.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buffer: &mut Vec<u8>,
) -> Result<(), String> {
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    buffer.clear();
    let (head, length) = loop {
        if stream.read_buf(buffer).await.map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection".into());
        }
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut answer = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(head) = answer.parse(buffer).map_err(|e| e.to_string())? {
            if answer.code != Some(200) {
                return Err(format!("HTTP status {:?}", answer.code));
            }
            let length = answer
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .ok_or("an answer without Content-Length")?;
            break (head, length);
        }
    };
    while buffer.len() < head + length {
        if stream.read_buf(buffer).await.map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection mid-body".into());
        }
    }
    Ok(())
}
