//! `keygate.sync.v1` (see `proto/keygate/sync/v1/sync.proto`): a keygate serving its snapshot to
//! other keygates ([`server`], the hub) and following another keygate's ([`client`], the
//! `grpc` snapshot source). One keygate reading a file or a control plane can so fan a revocation
//! out to every sidecar in milliseconds, each of which keeps working from its last good snapshot
//! while the hub is away and resumes with deltas when it is back.

pub mod client;
pub mod server;
mod wire;

/// Generated from `proto/keygate/sync/v1/sync.proto` at build time.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("keygate.sync.v1");
}

/// Messages larger than this are refused (a full snapshot of a million keys is ~300 MB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;
