//! Bearer tokens: one scope for clients, one for workers (SPEC §6). A scope whose token is not
//! set is open to loopback callers only: its requests must name a loopback host in `Host` (and
//! in `Origin`, when sent), so a web page whose name was rebound to 127.0.0.1 cannot drive the
//! server. The server refuses to listen beyond loopback unless both tokens are set.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, HOST, ORIGIN};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::AppState;

/// The token of an `Authorization: Bearer …` header; the scheme is matched case-insensitively
/// (RFC 9110 §11.1).
fn presented_token(request: &Request) -> Option<&str> {
    let value = request.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim_start())
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a host name (without port) is this machine's loopback: `localhost` or a loopback
/// address.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host of an authority (`host`, `host:port`, `[v6]:port`).
fn authority_host(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Whether the request names only loopback in `Host` (or the HTTP/2 authority) and `Origin`.
fn names_loopback_only(request: &Request) -> bool {
    let host = request
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    // A request with no Host at all is not from a browser (every browser sends one).
    if let Some(host) = host {
        if !is_loopback_host(authority_host(host.trim())) {
            return false;
        }
    }
    match request.headers().get(ORIGIN) {
        None => true,
        Some(origin) => origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .is_some_and(|(scheme, authority)| {
                matches!(scheme, "http" | "https") && is_loopback_host(authority_host(authority))
            }),
    }
}

fn admit(request: &Request, expected: Option<&str>) -> Result<(), ApiError> {
    match expected {
        None if names_loopback_only(request) => Ok(()),
        None => Err(ApiError::ForbiddenHost),
        Some(expected) => match presented_token(request) {
            Some(p) if constant_time_eq(p.as_bytes(), expected.as_bytes()) => Ok(()),
            _ => Err(ApiError::Unauthorized),
        },
    }
}

pub async fn require_client_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    admit(&request, state.config.api_token.as_deref())?;
    Ok(next.run(request).await)
}

pub async fn require_worker_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    admit(&request, state.config.worker_token.as_deref())?;
    Ok(next.run(request).await)
}

/// A new worker's secret and the hash the store keeps of it: 32 bytes from the kernel's
/// generator, URL-safe base64.
pub fn new_worker_secret() -> Result<(String, String), ApiError> {
    use base64::Engine;
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| ApiError::internal(format!("reading /dev/urandom: {e}")))?;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = secret_hash(&secret);
    Ok((secret, hash))
}

fn secret_hash(secret: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The worker secrets this server has checked against the store, by worker id: a worker's
/// secret never changes, so after its first call each worker call costs no store read. Any
/// server sharing the store verifies the same secret (the hash is in the store).
#[derive(Default)]
pub struct WorkerSecrets {
    verified: std::sync::RwLock<std::collections::HashMap<String, String>>,
}

/// Past this many cached workers the cache starts over (a bound, not an expected size).
const MAX_CACHED_WORKERS: usize = 65_536;

impl WorkerSecrets {
    /// Whether the call presenting `headers` is `worker_id`'s own: the secret handed out at its
    /// registration must be in `Tether-Worker-Secret`. Invariant: a worker call is served only
    /// for the worker whose secret it carries, so naming another worker's id is `403`.
    pub async fn verify(
        &self,
        store: &tether_store::SharedStore,
        worker_id: &str,
        headers: &axum::http::HeaderMap,
    ) -> Result<(), ApiError> {
        let cached = self
            .verified
            .read()
            .ok()
            .and_then(|m| m.get(worker_id).cloned());
        let expected = match cached {
            Some(hash) => hash,
            // A worker without a hash registered before secrets existed: it must register again.
            None => match store.worker_secret_hash(worker_id).await? {
                Some(hash) => hash,
                None => return Err(ApiError::UnknownWorker),
            },
        };
        // Unknown workers are told so (404) first, so they register again.
        let presented = headers
            .get(tether_api::WORKER_SECRET_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(secret_hash)
            .ok_or(ApiError::NotThisWorker)?;
        if !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            return Err(ApiError::NotThisWorker);
        }
        self.remember(worker_id, expected);
        Ok(())
    }

    /// Caches a worker's hash: at registration (so its first call reads nothing) and once a
    /// call has verified against the store.
    pub fn remember(&self, worker_id: &str, hash: String) {
        if let Ok(mut m) = self.verified.write() {
            if m.len() >= MAX_CACHED_WORKERS {
                m.clear();
            }
            m.insert(worker_id.to_string(), hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(host: &str, origin: Option<&str>, auth: Option<&str>) -> Request {
        let mut b = Request::builder().uri("/v1/runs").header(HOST, host);
        if let Some(o) = origin {
            b = b.header(ORIGIN, o);
        }
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn without_a_token_only_loopback_names_are_served() {
        for host in [
            "127.0.0.1:7070",
            "localhost:7070",
            "[::1]:7070",
            "LOCALHOST",
            "127.0.0.2",
        ] {
            assert!(admit(&request(host, None, None), None).is_ok(), "{host}");
        }
        for host in [
            "attacker.example:7070",
            "attacker.example",
            "10.0.0.1:7070",
            "[::2]:1",
        ] {
            assert!(
                matches!(
                    admit(&request(host, None, None), None),
                    Err(ApiError::ForbiddenHost)
                ),
                "{host}"
            );
        }
        let page = request("127.0.0.1:7070", Some("http://attacker.example"), None);
        assert!(matches!(admit(&page, None), Err(ApiError::ForbiddenHost)));
        let null = request("127.0.0.1:7070", Some("null"), None);
        assert!(matches!(admit(&null, None), Err(ApiError::ForbiddenHost)));
        let own = request("127.0.0.1:7070", Some("http://127.0.0.1:7070"), None);
        assert!(admit(&own, None).is_ok());
    }

    #[test]
    fn bearer_is_matched_case_insensitively_and_tokens_exactly() {
        for auth in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"] {
            assert!(
                admit(&request("h", None, Some(auth)), Some("s3cret")).is_ok(),
                "{auth}"
            );
        }
        for auth in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
            assert!(
                matches!(
                    admit(&request("h", None, Some(auth)), Some("s3cret")),
                    Err(ApiError::Unauthorized)
                ),
                "{auth}"
            );
        }
    }
}
