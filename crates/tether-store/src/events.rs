//! The body of each kind of event, typed: written by the engine, read back by the server and
//! the CLI, one shape for all. The stored JSON (and so the wire) is exactly what the stores
//! wrote by hand before: `status`/`end` are `{ "attempt", "error_code", "exit_code",
//! "status" }`, `attempt` is `{ "attempt", "worker_id" }`, `log` is `{ "stream" }`.

use serde_json::{json, Value};
use tether_domain::{ErrorCode, RunStatus};

use crate::{EventKind, OutputStream, StoreError, StoreResult};

/// A status a run took, as its `status` and `end` events say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusBody {
    pub status: RunStatus,
    pub attempt: u32,
    pub error_code: Option<ErrorCode>,
    pub exit_code: Option<i32>,
}

impl StatusBody {
    /// A status with no error and no exit code.
    pub fn plain(status: RunStatus, attempt: u32) -> StatusBody {
        StatusBody {
            status,
            attempt,
            error_code: None,
            exit_code: None,
        }
    }
}

/// What an event says, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// Every status transition.
    Status(StatusBody),
    /// A new attempt began, on this worker.
    Attempt { attempt: u32, worker_id: String },
    /// Output of one stream; the bytes travel beside the body.
    Log { stream: OutputStream },
    /// The run is terminal; nothing follows.
    End(StatusBody),
}

impl EventBody {
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::Status(_) => EventKind::Status,
            EventBody::Attempt { .. } => EventKind::Attempt,
            EventBody::Log { .. } => EventKind::Log,
            EventBody::End(_) => EventKind::End,
        }
    }

    /// The body as stored and sent.
    pub fn to_json(&self) -> Value {
        match self {
            EventBody::Status(s) | EventBody::End(s) => json!({
                "status": s.status.as_str(),
                "attempt": s.attempt,
                "error_code": s.error_code.map(|c| c.as_str()),
                "exit_code": s.exit_code,
            }),
            EventBody::Attempt { attempt, worker_id } => {
                json!({ "attempt": attempt, "worker_id": worker_id })
            }
            EventBody::Log { stream } => json!({ "stream": stream.as_str() }),
        }
    }

    /// Reads a stored body of `kind` back; `None` when it is not the shape this code writes.
    pub fn from_json(kind: EventKind, body: &Value) -> Option<EventBody> {
        let text = |key: &str| body.get(key).and_then(Value::as_str);
        let attempt = || {
            body.get("attempt")
                .and_then(Value::as_u64)
                .and_then(|a| u32::try_from(a).ok())
        };
        let status = || {
            Some(StatusBody {
                status: RunStatus::parse(text("status")?)?,
                attempt: attempt()?,
                error_code: match text("error_code") {
                    Some(code) => Some(ErrorCode::parse(code)?),
                    None => None,
                },
                exit_code: body
                    .get("exit_code")
                    .and_then(Value::as_i64)
                    .and_then(|c| i32::try_from(c).ok()),
            })
        };
        Some(match kind {
            EventKind::Status => EventBody::Status(status()?),
            EventKind::End => EventBody::End(status()?),
            EventKind::Attempt => EventBody::Attempt {
                attempt: attempt()?,
                worker_id: text("worker_id")?.to_string(),
            },
            EventKind::Log => EventBody::Log {
                stream: OutputStream::parse(text("stream")?)?,
            },
        })
    }

    /// Reads a body as a store keeps it (JSON text) for an event of `kind`; `Corrupt` when it
    /// is not what this code writes, as for any other column that will not decode.
    pub fn decode(kind: EventKind, text: &str) -> StoreResult<EventBody> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| StoreError::corrupt_while("event body", e))?;
        EventBody::from_json(kind, &value).ok_or_else(|| {
            StoreError::corrupt(format!(
                "a `{}` event's body is not its shape: {text}",
                kind.as_str()
            ))
        })
    }

    /// The status this event reports, for `status` and `end` events.
    pub fn status(&self) -> Option<&StatusBody> {
        match self {
            EventBody::Status(s) | EventBody::End(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_json_the_stores_always_wrote() {
        let failed = StatusBody {
            status: RunStatus::Failed,
            attempt: 2,
            error_code: Some(ErrorCode::OutputLimit),
            exit_code: Some(3),
        };
        let cases = [
            (
                EventBody::Status(failed),
                r#"{"attempt":2,"error_code":"output_limit","exit_code":3,"status":"failed"}"#,
            ),
            (
                EventBody::End(StatusBody::plain(RunStatus::Pending, 0)),
                r#"{"attempt":0,"error_code":null,"exit_code":null,"status":"pending"}"#,
            ),
            (
                EventBody::Attempt {
                    attempt: 1,
                    worker_id: "w".into(),
                },
                r#"{"attempt":1,"worker_id":"w"}"#,
            ),
            (
                EventBody::Log {
                    stream: OutputStream::Stderr,
                },
                r#"{"stream":"stderr"}"#,
            ),
        ];
        for (body, text) in cases {
            assert_eq!(body.to_json().to_string(), text);
            assert_eq!(
                EventBody::from_json(body.kind(), &body.to_json()),
                Some(body)
            );
        }
    }

    #[test]
    fn a_stored_body_not_of_its_kind_s_shape_is_corrupt() {
        let stored = r#"{"attempt":1,"worker_id":"w"}"#;
        assert_eq!(
            EventBody::decode(EventKind::Attempt, stored).ok(),
            Some(EventBody::Attempt {
                attempt: 1,
                worker_id: "w".into()
            })
        );
        for (kind, text) in [
            (EventKind::Status, stored),
            (EventKind::Log, r#"{"stream":"stdin"}"#),
            (EventKind::End, "not json"),
        ] {
            assert!(
                matches!(EventBody::decode(kind, text), Err(StoreError::Corrupt(_))),
                "{kind:?} {text}"
            );
        }
    }
}
