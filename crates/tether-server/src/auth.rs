//! Bearer tokens: one scope for clients, one for workers (SPEC §6). A scope whose token is not
//! set is open; the server refuses to listen beyond loopback unless both are set.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::AppState;

fn bearer_matches(request: &Request, expected: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit so timing does not reveal how much of a guess was right.
    presented.is_some_and(|p| {
        p.len() == expected.len()
            && p.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

pub async fn require_client_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if bearer_matches(&request, state.config.api_token.as_deref()) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::Unauthorized)
    }
}

pub async fn require_worker_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if bearer_matches(&request, state.config.worker_token.as_deref()) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::Unauthorized)
    }
}
