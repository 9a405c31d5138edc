//! TLS with rustls (ring): the listeners' server side (the proxy, ext_authz, the sync hub) and
//! the client side of the proxy's `https://` upstream connections.
//!
//! A [`TlsServer`] holds a listener's current `rustls::ServerConfig` behind an atomic pointer.
//! Each new connection takes the config in force when it arrives; [`TlsServer::watch`] reads the
//! certificate, key and client-CA files every second and, when their bytes change, builds a new
//! config and swaps it in. The whole config is swapped rather than only the certificate, so a
//! changed `client_ca` applies too, and no session resumes into trust decided by the old files.
//! A replacement that does not parse, or whose key does not match its certificate (cert and key
//! written one after the other), keeps the config in force and is logged once, naming the file;
//! the next change is tried again. Reading the bytes (not the mtime) makes Kubernetes Secret
//! symlink swaps, renames and in-place writes all look the same.
//!
//! Errors name files and what is wrong with them, never their contents: nothing here logs or
//! returns key material.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use sha2::{Digest, Sha256};
use tokio_rustls::server::TlsStream;

use crate::config::{ServerTlsSettings, TlsIdentity};

/// How often [`TlsServer::watch`] reads the files.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// ALPN of an HTTP listener that speaks both versions.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of a gRPC listener.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];

/// Says so when the certificate a listener is about to serve has expired (its notAfter is past):
/// rustls serves it, and every client will refuse the handshake.
fn warn_if_expired(listener: &str, path: &std::path::Path, leaf: &[u8]) {
    let now = unix_now();
    if let Some(at) = not_after(leaf).filter(|at| *at < now) {
        tracing::warn!(
            listener,
            cert = %path.display(),
            expired_seconds_ago = now - at,
            "TLS: the certificate served has expired; clients will refuse it"
        );
    }
}

/// The certificate a listener's files name, when it has expired: its notAfter, in seconds since
/// the Unix epoch (`config check` warns of it as `serve` does; files that cannot be read or do
/// not go together are `check_server`'s to report).
pub fn expired_at(settings: &ServerTlsSettings) -> Option<u64> {
    let config = Files::read(settings)
        .ok()?
        .server_config(settings, ALPN_HTTP)
        .ok()?;
    not_after(&config.leaf).filter(|at| *at < unix_now())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A DER certificate's notAfter, in seconds since the Unix epoch.
fn not_after(der: &[u8]) -> Option<u64> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let not_after = cert.tbs_certificate.validity.not_after;
    Some(not_after.to_unix_duration().as_secs())
}

/// Which configured file a [`TlsError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

/// Why TLS files cannot be used: the file, and what is wrong with it (never its contents).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    pub file: TlsFile,
    pub path: String,
    pub reason: String,
}

impl TlsError {
    fn new(file: TlsFile, path: &Path, reason: impl Into<String>) -> Self {
        Self {
            file,
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// The crypto provider keygate uses everywhere (ring; no OpenSSL, no process-wide default).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What went wrong in a PEM file, without quoting it (a malformed key file's lines are secret).
fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "is not valid PEM: a section has no END line".into(),
        E::IllegalSectionStart { .. } => "is not valid PEM: a malformed BEGIN line".into(),
        E::Base64Decode(_) => "is not valid PEM: a section is not base64".into(),
        E::Io(e) => format!("cannot be read: {}", e.kind()),
        E::NoItemsFound => "holds no PEM item of the expected kind".into(),
        E::SectionTooLarge => "is not valid PEM: a section is too large".into(),
        _ => "is not valid PEM".into(),
    }
}

/// A digest of the files' contents (an unreadable file counts as empty), to notice a change
/// without keeping a copy of a key. `None` when there are no files.
pub fn fingerprint_files(paths: &[&Path]) -> Option<[u8; 32]> {
    if paths.is_empty() {
        return None;
    }
    let mut h = Sha256::new();
    for path in paths {
        let bytes = std::fs::read(path).unwrap_or_default();
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(&bytes);
    }
    Some(h.finalize().into())
}

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::new(file, path, format!("cannot be read: {e}")))
}

fn certs(file: TlsFile, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(file, path, pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            file,
            path,
            "holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        let reason = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (PKCS#8 \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")".into()
            }
            e => pem_reason(&e),
        };
        TlsError::new(TlsFile::Key, path, reason)
    })
}

/// A certificate chain and its key, checked to belong together.
fn certified_key(
    identity: &TlsIdentity,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = certs(TlsFile::Cert, &identity.cert, cert_pem)?;
    let key = private_key(&identity.key, key_pem)?;
    let key = provider().key_provider.load_private_key(key).map_err(|_| {
        TlsError::new(
            TlsFile::Key,
            &identity.key,
            "is not a usable private key (RSA, ECDSA P-256/P-384 or Ed25519)",
        )
    })?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::new(
                TlsFile::Key,
                &identity.key,
                format!(
                    "does not match the certificate in {}",
                    identity.cert.display()
                ),
            ))
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(_) => Err(TlsError::new(
            TlsFile::Cert,
            &identity.cert,
            "the first certificate is not a valid X.509 certificate",
        )),
    }
}

/// A root store from the PEM certificates of `path`.
fn roots(file: TlsFile, path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certs(file, path, pem)? {
        store
            .add(cert)
            .map_err(|e| TlsError::new(file, path, format!("a certificate is not usable: {e}")))?;
    }
    Ok(store)
}

/// The bytes of a listener's files, as read at one moment.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    fn read(settings: &ServerTlsSettings) -> Result<Self, TlsError> {
        Ok(Files {
            cert: read(TlsFile::Cert, &settings.identity.cert)?,
            key: read(TlsFile::Key, &settings.identity.key)?,
            client_ca: settings
                .client_ca
                .as_deref()
                .map(|p| read(TlsFile::ClientCa, p))
                .transpose()?,
        })
    }

    /// Identifies these bytes without keeping a copy of the key.
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            let part = part.map_or(&[][..], Vec::as_slice);
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }

    fn server_config(
        &self,
        settings: &ServerTlsSettings,
        alpn: &[&[u8]],
    ) -> Result<InForce, TlsError> {
        let certified = certified_key(&settings.identity, &self.cert, &self.key)?;
        let leaf = certified.cert[0].clone();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(TlsFile::Cert, &settings.identity.cert, e.to_string()))?;
        let builder = match (&settings.client_ca, &self.client_ca) {
            (Some(path), Some(pem)) => {
                let roots = roots(TlsFile::ClientCa, path, pem)?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::new(TlsFile::ClientCa, path, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(InForce {
            config: Arc::new(config),
            leaf,
        })
    }
}

/// A listener's configuration, and the certificate it serves.
struct InForce {
    config: Arc<rustls::ServerConfig>,
    leaf: CertificateDer<'static>,
}

/// Read and check a listener's files (what `config check` does with them).
pub fn check_server(settings: &ServerTlsSettings) -> Result<(), TlsError> {
    Files::read(settings)?.server_config(settings, ALPN_HTTP)?;
    Ok(())
}

/// What the watcher last saw: the files' fingerprint, or why they could not be read.
type Seen = Result<[u8; 32], TlsError>;

/// A TLS listener's configuration, reloaded when its files change.
pub struct TlsServer {
    /// Which listener, for logs.
    name: &'static str,
    settings: ServerTlsSettings,
    alpn: &'static [&'static [u8]],
    current: ArcSwap<InForce>,
    /// What the files looked like at the last look, so a bad replacement is reported once.
    seen: Mutex<Seen>,
    /// Changed files that could not be put in force (the certificate in force was kept).
    failed_reloads: std::sync::atomic::AtomicU64,
}

impl TlsServer {
    /// Read the files now: a bad file stops start-up instead of the first handshake.
    pub fn new(
        name: &'static str,
        settings: ServerTlsSettings,
        alpn: &'static [&'static [u8]],
    ) -> Result<Arc<Self>, TlsError> {
        let files = Files::read(&settings)?;
        let config = files.server_config(&settings, alpn)?;
        warn_if_expired(name, &settings.identity.cert, &config.leaf);
        Ok(Arc::new(TlsServer {
            name,
            alpn,
            current: ArcSwap::from_pointee(config),
            seen: Mutex::new(Ok(files.fingerprint())),
            settings,
            failed_reloads: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Changed certificate files that could not be put in force, since start.
    pub fn failed_reloads(&self) -> u64 {
        self.failed_reloads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.load().config.clone()
    }

    /// The end-entity certificate new connections are served (DER).
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.current.load().leaf.clone()
    }

    /// The listener this is for (`proxy`, `ext_authz`, `sync_server`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// When the certificate new connections are served stops being valid (its notAfter), in
    /// seconds since the Unix epoch: for `/metrics`, so that a rotation that stopped happening
    /// is seen before clients refuse the certificate. The leaf's (the first in `tls_cert`), not
    /// an intermediate's. `None` for a certificate rustls accepted that x509-cert's strict
    /// DER parser does not (the metric is then absent).
    pub fn not_after(&self) -> Option<u64> {
        not_after(&self.certificate())
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.settings.client_ca.is_some()
    }

    /// The TLS handshake on an accepted connection, within `timeout`.
    pub async fn accept<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        &self,
        stream: S,
        timeout: Duration,
    ) -> std::io::Result<TlsStream<S>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Read the files; when they changed since the last look, put a config built from them in
    /// force, or keep the one in force and say why. Blocking file I/O.
    pub fn reload_if_changed(&self) {
        let files = Files::read(&self.settings);
        let seen = files.as_ref().map(Files::fingerprint).map_err(Clone::clone);
        {
            let mut last = self.seen.lock().expect("tls lock poisoned");
            if *last == seen {
                return;
            }
            *last = seen;
        }
        match files.and_then(|f| f.server_config(&self.settings, self.alpn)) {
            Ok(in_force) => {
                warn_if_expired(self.name, &self.settings.identity.cert, &in_force.leaf);
                self.current.store(Arc::new(in_force));
                tracing::info!(
                    listener = self.name,
                    cert = %self.settings.identity.cert.display(),
                    "TLS: new certificate files in force"
                );
            }
            Err(e) => {
                self.failed_reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    listener = self.name,
                    file = %e.path,
                    error = %e.reason,
                    "TLS: the changed certificate files are not usable; the certificate in force is kept"
                );
            }
        }
    }

    /// Look at the files every [`RELOAD_EVERY`] until `shutdown` resolves.
    pub async fn watch(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        }
    }
}

/// The client side of every https client (upstreams, the http snapshot source, usage reports):
/// `ca_file`'s certificates as the only roots (else the system's), a client certificate when
/// `identity` is given, and `alpn`.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<&TlsIdentity>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = match ca_file {
        Some(path) => roots(TlsFile::ClientCa, path, &read(TlsFile::ClientCa, path)?)?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "while reading the system's root certificates");
            }
            let mut store = rustls::RootCertStore::empty();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!("no system root certificates: https:// peers will not verify");
            }
            store
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(TlsFile::Cert, Path::new("<rustls>"), e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => {
            let certified = certified_key(
                id,
                &read(TlsFile::Cert, &id.cert)?,
                &read(TlsFile::Key, &id.key)?,
            )?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The name an upstream's certificate is checked against (and sent as SNI when it is a DNS
/// name): `host` of a URL authority, brackets of an IPv6 literal removed.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).ok()
}

#[cfg(test)]
mod tests;
