//! [`read`] against prost's decoding of the same bytes: whatever prost decodes, `read` reads
//! the same fields (last value wins, a map keeps one value per name, a repeated message merges,
//! a oneof's later variant replaces the earlier), including concatenated messages (which
//! protobuf merges) and mutated bytes.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{
    address, Address, HeaderMap, HeaderValue, Pipe, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use proptest::prelude::*;
use prost::Message as _;

use super::*;

type Owned = (
    bool,
    String,
    String,
    String,
    Option<String>,
    Vec<(Vec<u8>, Vec<u8>)>,
);

/// What `read` must find, from prost's decoding.
fn expected(req: &CheckRequest) -> Owned {
    let a = req.attributes.as_ref();
    let http = a
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    let peer = a
        .and_then(|a| a.source.as_ref())
        .and_then(|s| s.address.as_ref())
        .and_then(|a| match a.address.as_ref()? {
            address::Address::SocketAddress(s) => Some(s.address.clone()),
            _ => None,
        });
    let Some(http) = http else {
        return (false, "".into(), "".into(), "".into(), peer, Vec::new());
    };
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = http
        .headers
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    headers.sort();
    for h in http.header_map.iter().flat_map(|m| &m.headers) {
        let v = if h.raw_value.is_empty() {
            h.value.as_bytes().to_vec()
        } else {
            h.raw_value.clone()
        };
        headers.push((h.key.as_bytes().to_vec(), v));
    }
    (
        true,
        http.method.clone(),
        http.path.clone(),
        http.host.clone(),
        peer,
        headers,
    )
}

fn owned(f: &CheckFacts<'_>) -> Owned {
    (
        f.http,
        f.method.into(),
        f.path.into(),
        f.host.into(),
        f.peer.map(str::to_owned),
        f.headers
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect(),
    )
}

/// Whenever prost decodes `bytes`, `read` reads the same.
fn agrees(bytes: &[u8]) {
    if let Ok(req) = CheckRequest::decode(bytes) {
        let facts = read(bytes).expect("prost decoded it");
        assert_eq!(owned(&facts), expected(&req));
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("x-api-key".to_owned()),
        Just("authorization".to_owned()),
        Just("X-Request-Id".to_owned()),
        "[a-z_-]{0,6}",
    ]
}

fn peer() -> impl Strategy<Value = Option<Address>> {
    prop_oneof![
        Just(None),
        Just(Some(Address { address: None })),
        "[0-9.:a-f]{0,12}".prop_map(|a| Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: a,
                port_specifier: Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                        40000
                    )
                ),
                ..Default::default()
            })),
        })),
        Just(Some(Address {
            address: Some(address::Address::Pipe(Pipe {
                path: "/run/x".into(),
                mode: 0,
            })),
        })),
    ]
}

prop_compose! {
    fn check_request()(
        has_http in any::<bool>(),
        method in "[A-Z]{0,6}",
        path in "[/a-z?%0-9]{0,12}",
        host in "[a-z.:0-9]{0,10}",
        headers in proptest::collection::vec((name(), "[ -~]{0,8}"), 0..6),
        raw in proptest::option::of(proptest::collection::vec((name(), "[ -~]{0,4}", proptest::collection::vec(any::<u8>(), 0..4)), 0..4)),
        peer in peer(),
        body in "[a-z]{0,8}",
    ) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer { address: peer, principal: "spiffe://x".into(), ..Default::default() }),
                request: Some(Request {
                    http: has_http.then(|| HttpRequest {
                        method,
                        path,
                        host,
                        body,
                        headers: headers.into_iter().collect::<HashMap<_, _>>(),
                        header_map: raw.map(|raw| HeaderMap {
                            headers: raw.into_iter().map(|(key, value, raw_value)| HeaderValue { key, value, raw_value }).collect(),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: HashMap::from([("k".into(), "v".into())]),
                ..Default::default()
            }),
        }
    }
}

proptest! {
    #[test]
    fn reads_what_prost_decodes(req in check_request()) {
        agrees(&req.encode_to_vec());
    }

    /// Two messages one after the other are one message, the second merged into the first.
    #[test]
    fn reads_merged_messages_as_prost_merges_them(a in check_request(), b in check_request()) {
        let mut bytes = a.encode_to_vec();
        bytes.extend(b.encode_to_vec());
        agrees(&bytes);
    }

    /// Any byte changed: where prost still decodes, `read` agrees; where prost fails, `read`
    /// may read what it needs or fail, never panic.
    #[test]
    fn mutated_bytes_never_disagree(req in check_request(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = req.encode_to_vec();
        if !bytes.is_empty() {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        agrees(&bytes);
        let _ = read(&bytes);
    }
}

#[test]
fn malformed_bytes() {
    let table: &[&[u8]] = &[
        &[0x0a],             // a length missing
        &[0x0a, 0x05, 0x00], // a length past the end
        &[0x0a, 0xff],       // a varint that never ends
        &[0x08, 0x01],       // attributes as a varint
        // http.method (2) that is not UTF-8: attributes { request { http { method } } }
        &[0x0a, 0x07, 0x22, 0x05, 0x12, 0x03, 0x12, 0x01, 0xff],
    ];
    for bytes in table {
        assert!(CheckRequest::decode(*bytes).is_err(), "{bytes:?}");
        assert_eq!(read(bytes).unwrap_err(), Malformed, "{bytes:?}");
    }
    assert!(
        !read(&[]).unwrap().http,
        "an empty message has no HTTP request"
    );
}

/// prost reads a map field as length-delimited whatever its wire type says (it does not check
/// it), so `read` does too: here `Peer.labels` (3) sent as a fixed64.
#[test]
fn map_fields_are_length_delimited_whatever_their_wire_type() {
    // attributes { source { labels(3, wire type 1) <empty entry> } request { http {} } }
    let message = [0x0a, 0x08, 0x0a, 0x02, 0x19, 0x00, 0x22, 0x02, 0x12, 0x00];
    let req = CheckRequest::decode(&message[..]).expect("prost reads it");
    let labels = &req
        .attributes
        .as_ref()
        .unwrap()
        .source
        .as_ref()
        .unwrap()
        .labels;
    assert_eq!(labels.len(), 1, "one entry, empty name and value");
    agrees(&message);
}

/// Header bytes are passed on as they came, like the proxy front reads them: a value that is
/// not UTF-8 (which prost refuses to decode) is read, not a reason to refuse the request.
#[test]
fn headers_that_are_not_utf8_are_read_as_bytes() {
    // attributes { request { http { headers { key: "x-a", value: 0xff } } } }
    let entry = [0x0a, 0x03, b'x', b'-', b'a', 0x12, 0x01, 0xff];
    let mut http = vec![0x1a, entry.len() as u8];
    http.extend_from_slice(&entry);
    let mut request = vec![0x12, http.len() as u8];
    request.extend_from_slice(&http);
    let mut attributes = vec![0x22, request.len() as u8];
    attributes.extend_from_slice(&request);
    let mut message = vec![0x0a, attributes.len() as u8];
    message.extend_from_slice(&attributes);
    assert!(CheckRequest::decode(&message[..]).is_err());
    let facts = read(&message).unwrap();
    assert!(facts.http);
    assert_eq!(facts.headers, [(&b"x-a"[..], &[0xff][..])]);
}
