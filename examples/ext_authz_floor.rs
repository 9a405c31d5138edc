//! The floor a Check stands on: a tonic `envoy.service.auth.v3.Authorization` server that
//! decides nothing and answers every Check OK with one header, on one `current_thread` runtime
//! (as `bench/ext_authz.sh` runs keygate). Measuring it in the same run as keygate says how much
//! of keygate's CPU per Check is the gRPC stack (tonic, h2, prost) and how much is keygate's.
//!
//! ```sh
//! cargo build --release --example ext_authz_floor
//! FLOOR=1 bash bench/ext_authz.sh      # the same load against this server instead of keygate
//! ```

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderValue,
    HeaderValueOption, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;

struct Floor;

#[tonic::async_trait]
impl Authorization for Floor {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        // Decode the whole request like keygate does, then drop it.
        drop(request.into_inner());
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "x-partner-id".into(),
                        value: "partner_0001".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            dynamic_metadata: None,
        }))
    }
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: ext_authz_floor 127.0.0.1:PORT");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Floor))
            .serve(addr)
            .await
            .expect("the floor server runs");
    });
}
