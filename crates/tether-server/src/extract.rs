//! Extractors that turn axum's rejections into Tether's JSON errors, so bad input always gets
//! a stable code.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::FromRequest;
use axum::http::StatusCode;

use crate::error::ApiError;

/// `axum::Json`, answering bad bodies with `malformed_json` (400), `invalid_field` (422),
/// `unsupported_media_type` (415) or `body_too_large` (413).
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

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
