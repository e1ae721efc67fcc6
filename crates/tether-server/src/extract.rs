//! Extractors that turn axum's rejections into Tether's JSON errors, so bad input always gets
//! a stable code.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `axum::Json`, answering bad bodies with `malformed_json` (400), `invalid_field` (422),
/// `unsupported_media_type` (415) or `body_too_large` (413). A string holding NUL anywhere in
/// the body is `invalid_field`: PostgreSQL cannot store it, so neither store takes it.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".into(),
            ));
        }
        let body = Bytes::from_request(request, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge(crate::BODY_LIMIT_BYTES)
            } else {
                ApiError::MalformedJson(r.body_text())
            }
        })?;
        if has_nul_escape(&body) {
            return Err(ApiError::invalid(
                "invalid_field",
                "strings must not contain NUL (\\u0000)",
            ));
        }
        let axum::Json(value) = axum::Json::<T>::from_bytes(&body)?;
        Ok(ApiJson(value))
    }
}

/// The longest request URI served; longer is `414 uri_too_long`.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;
/// The most request headers served, by count and in all; more is `431 headers_too_large`.
pub(crate) const MAX_HEADER_COUNT: usize = 100;
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Checks a request's head before routing: a URI or headers past their caps get `414`/`431`
/// as JSON, and a path or query holding an encoded NUL (`%00`) gets `422 invalid_field`, so
/// ids and filters no store can hold never reach one. (Heads past hyper's own parse limits,
/// far beyond these, are answered by hyper.)
pub(crate) async fn check_request_head(
    request: Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    let uri = request.uri();
    if uri.to_string().len() > MAX_URI_BYTES {
        return Err(ApiError::UriTooLong);
    }
    let headers = request.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > MAX_HEADER_COUNT || header_bytes > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge);
    }
    let has_nul = |s: &str| s.as_bytes().windows(3).any(|w| w == b"%00");
    if has_nul(uri.path()) || uri.query().is_some_and(has_nul) {
        return Err(ApiError::invalid(
            "invalid_field",
            "path and query must not contain NUL (%00)",
        ));
    }
    Ok(next.run(request).await)
}

/// `application/json` or `application/*+json`, as `axum::Json` accepts.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5
                && subtype
                    .get(subtype.len() - 5..)
                    .is_some_and(|s| s.eq_ignore_ascii_case("+json")))
}

/// Whether JSON text holds the escape `\u0000` (raw NUL cannot appear in valid JSON). An
/// escape is real when an odd number of backslashes leads up to its `u`.
pub(crate) fn has_nul_escape(json: &[u8]) -> bool {
    json.windows(5).enumerate().any(|(at, w)| {
        w == b"u0000" && json[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
    })
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        match r {
            JsonRejection::JsonDataError(e) => {
                ApiError::invalid("invalid_field", body_text(&e.body_text()))
            }
            JsonRejection::JsonSyntaxError(e) => ApiError::MalformedJson(body_text(&e.body_text())),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".into(),
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::BodyTooLarge(crate::BODY_LIMIT_BYTES)
            }
            other => ApiError::MalformedJson(other.body_text()),
        }
    }
}

fn body_text(text: &str) -> String {
    text.trim_start_matches("Failed to deserialize the JSON body into the target type: ")
        .trim_start_matches("Failed to parse the request body as JSON: ")
        .to_string()
}

/// `axum::extract::Query`, answering bad query strings with `invalid_field` (422).
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::invalid("invalid_field", r.body_text())
    }
}

/// `axum::extract::Path`, answering bad path segments with `invalid_field` (422).
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::invalid("invalid_field", r.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::has_nul_escape;

    #[test]
    fn nul_escapes_are_told_from_escaped_backslashes() {
        assert!(has_nul_escape(br#"{"a":"x\u0000"}"#));
        assert!(has_nul_escape(br#"{"a":"\\\u0000"}"#));
        assert!(!has_nul_escape(br#"{"a":"\\u0000"}"#));
        assert!(!has_nul_escape(br#"{"a":"u0000"}"#));
    }
}
