//! Revocation propagation, measured: file → hub refuses, and hub applies → sidecar applies
//! (keygate.sync.v1 push), over many trials. Both keygates run in this process through
//! `app::start`, exactly as the binary runs them, on 127.0.0.1.
//!
//! Run: `cargo run --release --example propagation -- [trials] [keys]` (defaults 50, 10000).
//! Results go in BENCHMARKS.md.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

fn document(revision: u64, keys: &[String], revoked: usize) -> String {
    let entries: Vec<serde_json::Value> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            serde_json::json!({
                "id": format!("key_{i:06}"),
                "hash": format!("sha256:{}", hex::encode(Sha256::digest(k.as_bytes()))),
                "partner_id": "partner_acme",
                "environment": "live",
                "scopes": ["analyses:read"],
                "status": if i < revoked { "revoked" } else { "active" },
            })
        })
        .collect();
    serde_json::json!({
        "schema": "keygate.snapshot/v1", "revision": revision,
        "partners": [{"id": "partner_acme", "status": "active"}],
        "keys": entries,
    })
    .to_string()
}

fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn percentiles(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    println!(
        "{name:<34} n={:<4} p50={:>9.2?} p90={:>9.2?} p99={:>9.2?} max={:>9.2?}",
        v.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        v[v.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let trials: usize = args.next().map_or(50, |a| a.parse().unwrap());
    let filler: usize = args.next().map_or(10_000, |a| a.parse().unwrap());
    let keys: Vec<String> = (0..filler.max(trials + 1))
        .map(|_| keygate::credential::mint("sk_live_"))
        .collect();
    let dir = std::env::temp_dir().join(format!("keygate-propagation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.json");
    write_atomic(&path, &document(1, &keys, 0));

    let base =
        "environment = \"live\"\n[[key_prefixes]]\nprefix = \"sk_live_\"\nenvironment = \"live\"\n\
                [proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\n\
                [runtime]\nflavor = \"current_thread\"\n";
    let hub = keygate::app::start(
        keygate::config::from_toml(&format!(
            "{base}[snapshot]\npath = {:?}\n[sync_server]\nlisten = \"127.0.0.1:0\"\n",
            path.display().to_string()
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let sidecar = keygate::app::start(
        keygate::config::from_toml(&format!(
            "{base}[snapshot]\nsource = \"grpc\"\nurl = \"http://{}\"\n",
            hub.sync_addr.unwrap()
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        sidecar.store.current().as_ref().map(|s| s.revision),
        Some(1)
    );

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let status = |addr: std::net::SocketAddr, key: String| {
        let client = client.clone();
        async move {
            let req = http::Request::get(format!("http://{addr}/v1/analyses/1"))
                .header("x-api-key", key)
                .body(Empty::new())
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let s = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            s
        }
    };

    let (mut file_to_refuse, mut hub_to_sidecar, mut file_to_sidecar) =
        (Vec::new(), Vec::new(), Vec::new());
    for i in 0..trials {
        let revision = i as u64 + 2;
        let key = keys[i].clone();
        assert_ne!(status(hub.proxy_addr.unwrap(), key.clone()).await, 401);
        let mut hub_rev = hub.store.watch();
        let mut side_rev = sidecar.store.watch();
        let text = document(revision, &keys, i + 1);
        let t0 = Instant::now();
        write_atomic(&path, &text);
        let hub_applied = tokio::spawn(async move {
            hub_rev.wait_for(|r| *r == Some(revision)).await.unwrap();
            Instant::now()
        });
        let side_applied = tokio::spawn(async move {
            side_rev.wait_for(|r| *r == Some(revision)).await.unwrap();
            Instant::now()
        });
        loop {
            if status(hub.proxy_addr.unwrap(), key.clone()).await == 401 {
                file_to_refuse.push(t0.elapsed());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "never refused");
        }
        let (h, s) = (hub_applied.await.unwrap(), side_applied.await.unwrap());
        hub_to_sidecar.push(s.saturating_duration_since(h));
        file_to_sidecar.push(s.saturating_duration_since(t0));
        assert_eq!(status(sidecar.proxy_addr.unwrap(), key).await, 401);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{trials} revocations, {} keys in the snapshot", keys.len());
    percentiles("file written → hub refuses", file_to_refuse);
    percentiles("hub applied → sidecar applied", hub_to_sidecar);
    percentiles("file written → sidecar applied", file_to_sidecar);
    sidecar.shutdown().await;
    hub.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
