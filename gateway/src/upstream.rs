//! The gRPC services behind the gateway: one lazily connected channel each.

use std::time::{Duration, Instant};

use platform::grpc::{self, TracedChannel};
use serde::Serialize;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::config::Config;

/// One downstream service.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Short name used in `/ready` and metrics: `auth`, `profile`, `notes`.
    pub name: &'static str,
    /// The fully-qualified gRPC service whose health decides readiness.
    pub grpc_service: &'static str,
    pub channel: TracedChannel,
}

/// Every downstream service, connected lazily so the gateway starts in any order.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub auth: Upstream,
    pub profile: Upstream,
    pub notes: Upstream,
}

impl Upstreams {
    pub fn connect(config: &Config) -> Result<Self, tonic::transport::Error> {
        use proto::{
            auth::v1::auth_service_server, notes::v1::notes_service_server,
            profile::v1::profile_service_server,
        };
        let upstream =
            |name, grpc_service, url: &str| -> Result<Upstream, tonic::transport::Error> {
                Ok(Upstream {
                    name,
                    grpc_service,
                    channel: grpc::lazy_channel(url, config.upstream)?,
                })
            };
        Ok(Self {
            auth: upstream(
                "auth",
                auth_service_server::SERVICE_NAME,
                &config.identity.auth_url,
            )?,
            profile: upstream(
                "profile",
                profile_service_server::SERVICE_NAME,
                &config.profile_url,
            )?,
            notes: upstream(
                "notes",
                notes_service_server::SERVICE_NAME,
                &config.notes_url,
            )?,
        })
    }

    pub fn all(&self) -> [&Upstream; 3] {
        [&self.auth, &self.profile, &self.notes]
    }
}

/// What one health check found.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DependencyState {
    pub name: &'static str,
    pub service: &'static str,
    /// `SERVING`, `NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN`, `UNREACHABLE` or `TIMEOUT`.
    pub state: &'static str,
    pub latency_ms: f64,
}

impl DependencyState {
    pub fn is_serving(&self) -> bool {
        self.state == "SERVING"
    }
}

impl Upstream {
    /// Asks the service's `grpc.health.v1` for its own fully-qualified name.
    pub async fn check(&self, timeout: Duration) -> DependencyState {
        let started = Instant::now();
        let mut client = HealthClient::new(self.channel.clone());
        let request = HealthCheckRequest {
            service: self.grpc_service.to_owned(),
        };
        let state = match tokio::time::timeout(timeout, client.check(request)).await {
            Err(_) => "TIMEOUT",
            Ok(Err(status)) => {
                tracing::debug!(upstream = self.name, %status, "health check failed");
                "UNREACHABLE"
            }
            Ok(Ok(response)) => match response.into_inner().status() {
                ServingStatus::Serving => "SERVING",
                ServingStatus::NotServing => "NOT_SERVING",
                ServingStatus::ServiceUnknown => "SERVICE_UNKNOWN",
                ServingStatus::Unknown => "UNKNOWN",
            },
        };
        DependencyState {
            name: self.name,
            service: self.grpc_service,
            state,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        }
    }
}
