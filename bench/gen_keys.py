#!/usr/bin/env python3
"""Generate a deterministic set of API keys for the keygate load benchmark.

Usage:
    python3 bench/gen_keys.py N OUTDIR [--env live] [--prefix sk_live_] [--seed 42]

Writes into OUTDIR:
    keys.json            keygate snapshot (schema keygate.snapshot/v1) with N active keys
                         spread over ~100 partners
    nginx-keys.map       nginx `map` body: "<plaintext key>" <partner id>;
    nginx-key-ids.map    nginx `map` body: "<plaintext key>" <key id>;
    keys.txt             the N plaintext keys, one per line, in key-id order
    keys-unknown.txt     well-formed keys (valid checksum) that are NOT in the snapshot,
                         for negative tests

Key format: <prefix><body><checksum>
    body      32 chars of base62 (0-9A-Za-z)
    checksum  zlib.crc32((prefix + body).encode()) in base62, alphabet
              0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz,
              most significant digit first, left-padded with '0' to 6 chars

The keys depend only on --seed (and N, --prefix), so two runs with the same
arguments produce the same keys. `generated_at` defaults to the current time;
pass --generated-at to make the snapshot byte-for-byte reproducible.
These keys are benchmark fixtures, not secrets: do not use them anywhere real.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import re
import sys
import zlib
from pathlib import Path

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LEN = 32
CHECKSUM_LEN = 6
DISPLAY_PREFIX_BODY_CHARS = 4  # "sk_live_" + first 4 body chars -> "sk_live_Ab3d"
MAX_PARTNERS = 100
SCOPES = ["analyses:read", "analyses:write"]
CREATED_AT = "2026-01-15T10:30:00Z"


def base62(n: int, width: int) -> str:
    """Encode a non-negative int in base62, MSB first, left-padded with '0' to `width`."""
    if n < 0:
        raise ValueError("negative")
    digits = []
    while n:
        n, r = divmod(n, 62)
        digits.append(BASE62[r])
    s = "".join(reversed(digits)) or "0"
    return s.rjust(width, "0")


def checksum(prefix: str, body: str) -> str:
    # crc32 < 2^32 < 62^6, so 6 base62 digits always suffice.
    return base62(zlib.crc32((prefix + body).encode()) & 0xFFFFFFFF, CHECKSUM_LEN)


def make_key(rng: random.Random, prefix: str) -> str:
    body = "".join(rng.choice(BASE62) for _ in range(BODY_LEN))
    return prefix + body + checksum(prefix, body)


def partner_id(n: int) -> str:
    return f"partner_{n:04d}"


def render_snapshot(snapshot: dict) -> str:
    """JSON with one partner / key object per line: readable, and ~3x smaller than indent=2."""
    def lines(items: list) -> str:
        return ",\n".join("    " + json.dumps(x, separators=(", ", ": ")) for x in items)

    head = {k: v for k, v in snapshot.items() if k not in ("partners", "keys")}
    out = ["{"]
    out += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    out.append('  "partners": [\n' + lines(snapshot["partners"]) + "\n  ],")
    out.append('  "keys": [\n' + lines(snapshot["keys"]) + "\n  ]")
    out.append("}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, help="number of keys")
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--env", default="live", help="environment of the keys (default: live)")
    ap.add_argument("--prefix", default="sk_live_", help="key prefix (default: sk_live_)")
    ap.add_argument("--seed", type=int, default=42, help="RNG seed (default: 42)")
    ap.add_argument("--generated-at", default=None,
                    help="snapshot generated_at (RFC 3339, default: now, UTC)")
    ap.add_argument("--revision", type=int, default=1, help="snapshot revision (default: 1)")
    ap.add_argument("--unknown", type=int, default=5,
                    help="number of well-formed keys NOT in the snapshot to write to keys-unknown.txt")
    args = ap.parse_args(argv)

    if args.n < 1:
        ap.error("N must be >= 1")
    # The prefix ends up unquoted-safe in nginx configs and in TOML; keep it boring.
    if not re.fullmatch(r"[A-Za-z0-9_]+", args.prefix):
        ap.error("prefix must match [A-Za-z0-9_]+")

    generated_at = args.generated_at or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    rng = random.Random(args.seed)
    n_partners = min(MAX_PARTNERS, args.n)

    keys: list[str] = []
    seen: set[str] = set()
    # nginx `map` lookups are case-insensitive: also refuse keys that collide after
    # lowercasing so the nginx config always loads (astronomically unlikely anyway).
    seen_lower: set[str] = set()
    while len(keys) < args.n:
        k = make_key(rng, args.prefix)
        if k in seen or k.lower() in seen_lower:
            continue
        seen.add(k)
        seen_lower.add(k.lower())
        keys.append(k)

    partners = [
        {"id": partner_id(p), "org_id": f"org_{p}", "status": "active"}
        for p in range(1, n_partners + 1)
    ]

    key_entries = []
    for i, k in enumerate(keys):
        key_entries.append({
            "id": f"key_{i + 1:07d}",
            "name": "bench",
            "prefix": k[: len(args.prefix) + DISPLAY_PREFIX_BODY_CHARS],
            "hash": "sha256:" + hashlib.sha256(k.encode()).hexdigest(),
            "partner_id": partner_id(i % n_partners + 1),
            "environment": args.env,
            "scopes": list(SCOPES),
            "status": "active",
            "created_at": CREATED_AT,
        })

    snapshot = {
        "schema": "keygate.snapshot/v1",
        "revision": args.revision,
        "generated_at": generated_at,
        "partners": partners,
        "keys": key_entries,
    }

    # Separate RNG stream so unknown keys do not change when N changes.
    unk_rng = random.Random(f"{args.seed}-unknown")
    unknown: list[str] = []
    while len(unknown) < args.unknown:
        k = make_key(unk_rng, args.prefix)
        if k.lower() not in seen_lower:
            unknown.append(k)

    out: Path = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    (out / "keys.json").write_text(render_snapshot(snapshot))
    (out / "keys.txt").write_text("".join(k + "\n" for k in keys))
    (out / "keys-unknown.txt").write_text("".join(k + "\n" for k in unknown))
    (out / "nginx-keys.map").write_text(
        "".join(f'"{k}" {e["partner_id"]};\n' for k, e in zip(keys, key_entries)))
    (out / "nginx-key-ids.map").write_text(
        "".join(f'"{k}" {e["id"]};\n' for k, e in zip(keys, key_entries)))

    print(f"wrote {args.n} keys over {n_partners} partners to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
