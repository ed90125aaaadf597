//! The gateway's routes, one module per concern, merged in [`router`].

mod admin;
mod auth;
mod ops;
mod profile;

use axum::Router;

use crate::{AppState, middleware::Edge};

/// Every route the gateway serves, before the middleware every route shares.
///
/// Operators' routes (`/health`, `/ready`, `/metrics`) stay outside the edge guard: they are
/// never shed, so probes and scrapes still answer under overload, and `/ready` bounds its own
/// checks. API routes, one module per upstream service, go behind it: each module's
/// `router()` merged into `api`, a route class with its own timeout guarded separately with
/// `edge.guard(class_routes, its_timeout)`.
pub(crate) fn router(edge: &Edge, extra_api_routes: Router<AppState>) -> Router<AppState> {
    let api = Router::new()
        .merge(admin::router())
        .merge(auth::router())
        .merge(profile::router())
        .merge(extra_api_routes);
    ops::router().merge(edge.guard(api, edge.config().request_timeout))
}
