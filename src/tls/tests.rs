//! Loading and reloading certificate files: what is refused, what each error names, and that a
//! bad replacement keeps the certificate in force.

use std::path::{Path, PathBuf};

use super::*;

/// A self-signed certificate for `name` and its key, PEM.
fn pair(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Write `text` at `name` atomically (temp file + rename).
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    fn settings(&self, client_ca: Option<&str>) -> ServerTlsSettings {
        ServerTlsSettings {
            identity: TlsIdentity {
                cert: self.dir.path().join("cert.pem"),
                key: self.dir.path().join("key.pem"),
            },
            client_ca: client_ca.map(|n| self.dir.path().join(n)),
        }
    }
}

fn served_cert(server: &TlsServer) -> Vec<u8> {
    server.certificate().to_vec()
}

#[test]
fn what_each_bad_file_is_reported_as() {
    let d = Dir::new();
    let (cert, key) = pair("a.test");
    let (_, other_key) = pair("b.test");
    // name, certificate file, key file, client CA file, the file blamed, what is said of it
    type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, TlsFile, &'a str);
    let cases: Vec<Case> = vec![
        ("a good pair", &cert, &key, None, TlsFile::Cert, ""),
        (
            "key of another certificate",
            &cert,
            &other_key,
            None,
            TlsFile::Key,
            "does not match the certificate",
        ),
        (
            "not PEM",
            "hello",
            &key,
            None,
            TlsFile::Cert,
            "no PEM certificate",
        ),
        (
            "a certificate where the key should be",
            &cert,
            &cert,
            None,
            TlsFile::Key,
            "no PEM private key",
        ),
        (
            "a truncated key",
            &cert,
            &key[..key.len() / 2],
            None,
            TlsFile::Key,
            "not valid PEM",
        ),
        (
            "a client CA that is a key",
            &cert,
            &key,
            Some("ca.pem"),
            TlsFile::ClientCa,
            "no PEM certificate",
        ),
    ];
    for (name, c, k, ca, file, reason) in cases {
        d.write("cert.pem", c);
        d.write("key.pem", k);
        d.write("ca.pem", &key);
        let got = check_server(&d.settings(ca));
        if reason.is_empty() {
            assert!(got.is_ok(), "{name}: {got:?}");
            continue;
        }
        let e = got.expect_err(name);
        assert_eq!(e.file, file, "{name}: {e}");
        assert!(e.reason.contains(reason), "{name}: {e}");
        // Never any of the key's text.
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        for chunk in body.as_bytes().chunks(16) {
            let chunk = std::str::from_utf8(chunk).unwrap();
            assert!(
                !e.to_string().contains(chunk),
                "{name}: key material in {e}"
            );
        }
    }
    let missing = ServerTlsSettings {
        identity: TlsIdentity {
            cert: PathBuf::from("/nonexistent/cert.pem"),
            key: d.dir.path().join("key.pem"),
        },
        client_ca: None,
    };
    let e = check_server(&missing).unwrap_err();
    assert_eq!(e.file, TlsFile::Cert);
    assert!(
        e.to_string()
            .starts_with("/nonexistent/cert.pem: cannot be read"),
        "{e}"
    );
}

#[test]
fn a_changed_pair_is_put_in_force_and_a_bad_one_is_not() {
    let d = Dir::new();
    let (cert1, key1) = pair("one.test");
    d.write("cert.pem", &cert1);
    d.write("key.pem", &key1);
    let server = TlsServer::new("test", d.settings(None), ALPN_HTTP).unwrap();
    let first = served_cert(&server);
    assert_eq!(
        server.config().alpn_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );

    // Unchanged files: the same config object.
    let before = server.config();
    server.reload_if_changed();
    assert!(Arc::ptr_eq(&before, &server.config()));

    // The certificate is replaced first, its key after: in between, the old pair stays.
    let (cert2, key2) = pair("two.test");
    d.write("cert.pem", &cert2);
    server.reload_if_changed();
    assert_eq!(served_cert(&server), first, "a mismatched pair is not used");
    d.write("key.pem", &key2);
    server.reload_if_changed();
    let second = served_cert(&server);
    assert_ne!(second, first, "the matching pair is in force");

    // A broken file, then a missing one: the pair in force stays.
    d.write("cert.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
    server.reload_if_changed();
    assert_eq!(served_cert(&server), second);
    std::fs::remove_file(d.dir.path().join("cert.pem")).unwrap();
    server.reload_if_changed();
    assert_eq!(served_cert(&server), second);
    // Back to a good pair: taken.
    d.write("cert.pem", &cert1);
    d.write("key.pem", &key1);
    server.reload_if_changed();
    assert_eq!(served_cert(&server), first);
}

#[test]
fn upstream_names() {
    for (host, ok) in [
        ("api.example.com", true),
        ("127.0.0.1", true),
        ("[::1]", true),
        ("localhost", true),
        ("bad name", false),
        ("", false),
    ] {
        assert_eq!(server_name(host).is_some(), ok, "{host:?}");
    }
    assert!(matches!(
        server_name("[::1]"),
        Some(ServerName::IpAddress(_))
    ));
}

#[test]
fn client_config_refuses_a_ca_file_without_certificates() {
    let d = Dir::new();
    let (_, key) = pair("x.test");
    let p = d.write("ca.pem", &key);
    let e = client_config(Some(&p), None, &[]).unwrap_err();
    assert_eq!(e.file, TlsFile::ClientCa);
    let e = client_config(Some(Path::new("/nonexistent/ca.pem")), None, &[]).unwrap_err();
    assert!(e.to_string().contains("cannot be read"), "{e}");
}
