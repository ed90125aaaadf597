//! The set comes up healthy: `/ready`, gRPC health, reflection, metrics.

use std::time::Duration;

use e2e::{Infra, Stack, eventually, http_get};
use tokio_stream::StreamExt as _;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test]
async fn ready_turns_200_once_every_service_serves() {
    let infra = Infra::from_env();
    let stack = Stack::start(&infra).await;

    let liveness = http_get(stack.gateway.addr, "/health").await;
    assert_eq!(liveness.status, 200, "liveness needs no dependency");

    let ready = eventually(Duration::from_secs(30), "/ready = 200", || async {
        let response = http_get(stack.gateway.addr, "/ready").await;
        (response.status == 200).then_some(response)
    })
    .await;
    let body = ready.json();
    assert_eq!(body["status"], "ready");
    let dependencies = body["dependencies"].as_array().expect("dependencies list");
    let mut names: Vec<&str> = dependencies
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["auth", "notes", "profile"]);
    assert!(
        dependencies.iter().all(|d| d["state"] == "SERVING"),
        "{body}"
    );
    // Redis answers, and the gateway catches up with auth's change stream: nothing degraded.
    eventually(Duration::from_secs(10), "nothing degraded", || async {
        let body = http_get(stack.gateway.addr, "/ready").await.json();
        (body["degraded"] == serde_json::json!([])).then_some(())
    })
    .await;
    assert!(
        ready.headers.contains_key("x-request-id"),
        "every response carries a request id"
    );

    let metrics = http_get(stack.gateway.addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or_default().starts_with("text/plain")),
    );
    let text = metrics.text();
    assert!(
        text.contains("http_requests_total{") && text.contains(r#"route="/ready""#),
        "{text}"
    );

    stack.stop().await;
}

#[tokio::test]
async fn each_service_reports_serving_for_itself_and_overall() {
    let infra = Infra::from_env();
    let stack = Stack::start(&infra).await;

    for (service_name, running) in stack.services() {
        let mut health = HealthClient::new(running.channel().await);
        for name in ["", service_name] {
            let status = eventually(Duration::from_secs(30), "SERVING", || {
                let mut health = health.clone();
                async move {
                    let response = health
                        .check(HealthCheckRequest {
                            service: name.to_owned(),
                        })
                        .await
                        .ok()?;
                    let status = response.into_inner().status();
                    (status == ServingStatus::Serving).then_some(status)
                }
            })
            .await;
            assert_eq!(status, ServingStatus::Serving, "{service_name} / {name:?}");
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".to_owned(),
            })
            .await
            .expect_err("an unknown service is NOT_FOUND");
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }

    stack.stop().await;
}

#[tokio::test]
async fn reflection_lists_each_service() {
    let infra = Infra::from_env();
    let stack = Stack::start(&infra).await;

    for (service_name, running) in stack.services() {
        let mut reflection = ServerReflectionClient::new(running.channel().await);
        let response = reflect(&mut reflection, MessageRequest::ListServices(String::new())).await;
        let Some(MessageResponse::ListServicesResponse(list)) = response else {
            panic!("expected a service list, got {response:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in [
            service_name,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }

        // The descriptor behind the name resolves too, so tools like grpcurl can call it.
        let response = reflect(
            &mut reflection,
            MessageRequest::FileContainingSymbol(service_name.to_owned()),
        )
        .await;
        assert!(
            matches!(
                response,
                Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
            ),
            "{service_name}: {response:?}"
        );
    }

    stack.stop().await;
}

/// One request on the reflection stream, and its one answer.
async fn reflect(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: MessageRequest,
) -> Option<MessageResponse> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection stream")
        .into_inner()
        .next()
        .await
        .expect("one response")
        .expect("no error")
        .message_response
}
