//! The decide benchmark's fixture, shared with `examples/decide_count.rs`: a 100,000-key
//! snapshot (100 partners) and a 100-route policy.

use sha2::{Digest, Sha256};

use keygate::config::{from_toml, Settings};
use keygate::credential::mint;
use keygate::snapshot::{parse, Snapshot};

pub const KEYS: usize = 100_000;
pub const ROUTES: usize = 100;

pub fn snapshot() -> (Snapshot, Vec<String>) {
    let mut keys_json = Vec::with_capacity(KEYS);
    let mut secrets = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        let secret = mint("sk_live_");
        let hash = hex::encode(Sha256::digest(secret.as_bytes()));
        keys_json.push(serde_json::json!({
            "id": format!("key_{i:06}"),
            "hash": format!("sha256:{hash}"),
            "partner_id": format!("partner_{:03}", i % 100),
            "environment": "live",
            "scopes": ["analyses:read", "analyses:write", "reports:read"],
            "status": "active",
        }));
        secrets.push(secret);
    }
    let partners: Vec<_> = (0..100)
        .map(|p| serde_json::json!({"id": format!("partner_{p:03}"), "org_id": "org_1", "status": "active"}))
        .collect();
    let doc = serde_json::json!({
        "schema": "keygate.snapshot/v1", "revision": 1,
        "partners": partners, "keys": keys_json,
    });
    let snap = parse(&serde_json::to_vec(&doc).unwrap(), None).unwrap();
    assert_eq!(snap.key_count(), KEYS);
    (snap, secrets)
}

pub fn settings() -> Settings {
    let mut toml = String::from(
        "environment = \"live\"\n[[key_prefixes]]\nprefix = \"sk_live_\"\nenvironment = \"live\"\n\
         [snapshot]\npath = \"unused.json\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    // 100 routes over 10 resources, with literals, `*` and `**` mixed as a real API would.
    for r in 0..ROUTES / 10 {
        for (method, tail) in [
            ("GET", ""),
            ("POST", ""),
            ("GET", "/*"),
            ("PUT", "/*"),
            ("DELETE", "/*"),
            ("GET", "/*/items"),
            ("POST", "/*/items"),
            ("GET", "/*/items/*"),
            ("GET", "/export/**"),
            ("PATCH", "/*"),
        ] {
            toml.push_str(&format!(
                "[[routes.rule]]\nroute = \"{method} /v1/resource{r}{tail}\"\nscopes = [\"analyses:read\"]\n"
            ));
        }
    }
    let s = from_toml(&toml).unwrap();
    assert_eq!(s.policy.routes.len(), ROUTES);
    s
}
