//! The OpenAPI document served at `/openapi.json`.

use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tether",
        description = "Runs commands and always knows which of them are alive."
    ),
    paths(
        crate::routes::runs::create_run,
        crate::routes::runs::create_runs,
        crate::routes::runs::get_run,
        crate::routes::runs::list_runs,
        crate::routes::runs::cancel_run,
        crate::routes::lanes::list_lanes,
        crate::routes::runs::run_logs,
        crate::routes::output::run_output,
        crate::events::run_events,
        crate::routes::workers::register_worker,
        crate::routes::workers::deregister_worker,
        crate::routes::workers::list_workers,
        crate::routes::workers::claim,
        crate::routes::workers::heartbeat,
        crate::routes::workers::release,
        crate::routes::workers::control,
        crate::routes::attempts::start,
        crate::routes::attempts::append_logs,
        crate::routes::attempts::finish,
        crate::routes::attempts::report_attempts,
        crate::routes::endpoints::put_endpoint,
        crate::routes::endpoints::delete_endpoint,
        crate::routes::endpoints::list_endpoints,
        crate::routes::endpoints::put_pool,
        crate::routes::endpoints::list_pools,
        crate::routes::endpoints::dispatch,
    ),
    components(schemas(
        tether_api::RunView,
        tether_api::RunList,
        tether_api::AttemptView,
        tether_api::ErrorBody,
        tether_api::ErrorDetail,
        tether_api::SubmitRequest,
        tether_api::BatchSubmitRequest,
        tether_api::BatchSubmitResponse,
        tether_api::EventView,
        tether_api::OutputPage,
        tether_api::RegisterWorkerRequest,
        tether_api::RegisterWorkerResponse,
        tether_api::ClaimRequest,
        tether_api::ClaimResponse,
        tether_api::Assignment,
        tether_api::HeartbeatRequest,
        tether_api::HeartbeatResponse,
        tether_api::ReleaseRequest,
        tether_api::ReleaseResponse,
        tether_api::ControlRequest,
        tether_api::ControlResponse,
        tether_api::StartRequest,
        tether_api::AppendLogRequest,
        tether_api::AppendLogResponse,
        tether_api::FinishRequest,
        tether_api::AttemptReportsRequest,
        tether_api::AttemptStartWire,
        tether_api::AttemptFinishWire,
        tether_api::ReportClaim,
        tether_api::AttemptReportsResponse,
        tether_api::ReportAnswer,
        tether_api::ReportRefusal,
        tether_api::WorkerList,
        tether_api::WorkerView,
        tether_api::LaneView,
        tether_api::LaneList,
        tether_api::PutEndpointRequest,
        tether_api::EndpointView,
        tether_api::EndpointList,
        tether_api::PutPoolRequest,
        tether_api::PoolView,
        tether_api::PoolList,
        tether_api::DispatchView,
    ))
)]
struct ApiDoc;

/// The document as served: the handlers' annotations, with every path parameter declared and
/// the error answers any call can get (from the guards, the extractors and the store) listed
/// on every operation, so the document names every status the server can answer.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return doc;
    };
    for (path, item) in paths.iter_mut() {
        let names: Vec<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (_method, op) in item.iter_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            declare_path_params(op, &names);
            add_common_errors(op);
        }
    }
    doc
}

fn declare_path_params(op: &mut serde_json::Map<String, serde_json::Value>, names: &[&str]) {
    let params = op
        .entry("parameters")
        .or_insert_with(|| serde_json::json!([]));
    let Some(params) = params.as_array_mut() else {
        return;
    };
    for name in names {
        let declared = params
            .iter()
            .any(|p| p["name"] == *name && p["in"] == "path");
        if declared {
            continue;
        }
        let schema = if *name == "attempt" {
            serde_json::json!({"type": "integer", "format": "int32", "minimum": 1})
        } else {
            serde_json::json!({"type": "string", "minLength": 1})
        };
        params.push(serde_json::json!({
            "name": name,
            "in": "path",
            "required": true,
            "schema": schema,
        }));
    }
}

/// Answers every operation may give whatever its handler does.
const COMMON_ERRORS: &[(&str, &str)] = &[
    ("400", "malformed JSON"),
    ("401", "missing or wrong bearer token"),
    (
        "403",
        "forbidden_host (tokens off, a Host or Origin that is not loopback) or not_this_worker",
    ),
    ("404", "not found"),
    ("405", "method not allowed"),
    ("409", "conflict"),
    ("413", "body too large"),
    ("414", "URI too long"),
    ("415", "not sent as JSON"),
    ("422", "invalid field"),
    ("431", "headers too large"),
    ("503", "store unavailable (see Retry-After)"),
];

fn add_common_errors(op: &mut serde_json::Map<String, serde_json::Value>) {
    let responses = op
        .entry("responses")
        .or_insert_with(|| serde_json::json!({}));
    let Some(responses) = responses.as_object_mut() else {
        return;
    };
    for (status, description) in COMMON_ERRORS {
        responses.entry(*status).or_insert_with(|| {
            serde_json::json!({
                "description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            })
        });
    }
}

#[cfg(test)]
mod tests {
    /// The document is the contract clients are generated from: any change to it must be
    /// deliberate. Moving types between crates must leave it the same; a deliberate change
    /// re-records it with `TETHER_BLESS_OPENAPI=1`.
    #[test]
    fn document_matches_the_recorded_contract() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openapi.json");
        let served = super::document();
        if std::env::var_os("TETHER_BLESS_OPENAPI").is_some() {
            let text = serde_json::to_string_pretty(&served).unwrap() + "\n";
            std::fs::write(path, text).unwrap();
            return;
        }
        let recorded: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        if let Some(at) = first_difference(&served, &recorded, String::new()) {
            panic!(
                "GET /openapi.json differs from {path} at `{at}`; if the change is meant, \
                 re-record it with TETHER_BLESS_OPENAPI=1 cargo nextest run -p tether-server \
                 -E 'test(document_matches)'"
            );
        }
    }

    /// A key as a JSON pointer token (`/v1/runs` → `~1v1~1runs`).
    fn token(key: &str) -> String {
        key.replace('~', "~0").replace('/', "~1")
    }

    /// The JSON pointer of the first place `a` and `b` differ, if they do.
    fn first_difference(
        a: &serde_json::Value,
        b: &serde_json::Value,
        at: String,
    ) -> Option<String> {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                keys.into_iter().find_map(|k| match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => first_difference(x, y, format!("{at}/{}", token(k))),
                    _ => Some(format!("{at}/{}", token(k))),
                })
            }
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
                .iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (x, y))| first_difference(x, y, format!("{at}/{i}"))),
            _ => (a != b).then_some(at),
        }
    }

    #[test]
    fn every_path_parameter_is_declared() {
        let doc = super::document();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for name in path
                    .split('/')
                    .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                {
                    let declared = op["parameters"].as_array().is_some_and(|ps| {
                        ps.iter().any(|p| p["name"] == name && p["in"] == "path")
                    });
                    assert!(declared, "{method} {path}: {name} is not declared");
                }
                assert!(op["responses"]["422"].is_object(), "{method} {path}");
            }
        }
    }
}
