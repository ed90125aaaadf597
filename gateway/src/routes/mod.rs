//! The gateway's routes, one module per concern, merged in [`router`].

mod ops;

use axum::Router;

use crate::AppState;

/// Every route the gateway serves.
pub fn router(state: AppState) -> Router {
    Router::new().merge(ops::router()).with_state(state)
}
