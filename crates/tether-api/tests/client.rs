//! The client against a small fake server over real HTTP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use tether_api::{ClientError, SubmitRequest, TetherClient};

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

async fn serve(seen: Seen) -> SocketAddr {
    let app = Router::new()
        .route("/v1/runs", post(submit_full))
        .route("/v1/runs/r1/events", get(events))
        .route("/v1/runs/r1/attempts/1/finish", post(stale))
        .route("/v1/runs/r1/logs", get(logs))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn remember(seen: &Seen, headers: &HeaderMap, what: String) {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    seen.0.lock().unwrap().push(format!("{what} auth={auth}"));
}

async fn submit_full(State(seen): State<Seen>, headers: HeaderMap) -> Response {
    remember(&seen, &headers, "submit".into());
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "7")],
        r#"{"error":{"code":"lane_full","message":"lane builds is full"}}"#,
    )
        .into_response()
}

async fn stale() -> Response {
    (
        StatusCode::CONFLICT,
        r#"{"error":{"code":"stale_attempt","message":"attempt 1 is not current"}}"#,
    )
        .into_response()
}

async fn logs() -> Response {
    (StatusCode::OK, b"\xff\xfeabc\n".to_vec()).into_response()
}

async fn events(
    State(seen): State<Seen>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    remember(&seen, &headers, format!("events {q:?} accept={accept}"));
    if accept.contains("ndjson") {
        let body = concat!(
            r#"{"type":"status","seq":1,"ts":"t","status":"running"}"#,
            "\n\n",
            r#"{"type":"heartbeat","ts":"t"}"#,
            "\n",
            r#"{"type":"end","seq":2,"ts":"t"}"#
        );
        return ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
    }
    let body = concat!(
        "id: 1\nevent: status\ndata: {\"type\":\"status\",\"seq\":1,\"ts\":\"t\",\"status\":\"running\"}\n\n",
        "event: heartbeat\ndata: {\"type\":\"heartbeat\",\"ts\":\"t\"}\n\n",
        "id: 2\nevent: log\ndata: {\"type\":\"log\",\"seq\":2,\"ts\":\"t\",\"stream\":\"stdout\",\"text\":\"hi\\n\"}\n\n",
        "id: 3\nevent: end\ndata: {\"type\":\"end\",\"seq\":3,\"ts\":\"t\"}\n\n",
    );
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

#[tokio::test]
async fn error_bodies_become_typed_errors_with_retry_after() {
    let seen = Seen::default();
    let addr = serve(seen.clone()).await;
    let client = TetherClient::new(&format!("http://{addr}"), Some("sekrit".into())).unwrap();
    let request = SubmitRequest {
        command: vec!["true".into()],
        ..SubmitRequest::default()
    };
    let err = client.submit(&request).await.unwrap_err();
    assert_eq!(
        err,
        ClientError::Api {
            status: 503,
            code: "lane_full".into(),
            message: "lane builds is full".into(),
            retry_after: Some(7),
        }
    );
    assert!(err.is_retryable());
    assert_eq!(seen.0.lock().unwrap()[0], "submit auth=Bearer sekrit");

    let finish = tether_api::FinishRequest {
        worker_id: "w1".into(),
        status: tether_domain::RunStatus::Succeeded,
        error_code: None,
        exit_code: Some(0),
        error_message: None,
    };
    let err = client.finish_attempt("r1", 1, &finish).await.unwrap_err();
    assert!(err.is_stale_attempt());
    let err = client.get_run("nope").await.unwrap_err();
    assert_eq!(err.status(), Some(404));
}

#[tokio::test]
async fn logs_come_back_as_raw_bytes() {
    let addr = serve(Seen::default()).await;
    let client = TetherClient::new(&format!("http://{addr}"), None).unwrap();
    assert_eq!(&client.logs("r1").await.unwrap()[..], b"\xff\xfeabc\n");
}

#[tokio::test]
async fn sse_events_carry_type_id_and_view() {
    let seen = Seen::default();
    let addr = serve(seen.clone()).await;
    let client = TetherClient::new(&format!("http://{addr}"), None).unwrap();
    let items: Vec<_> = client.events("r1", Some(5), true).collect().await;
    let items: Vec<_> = items.into_iter().map(Result::unwrap).collect();
    let summary: Vec<(String, Option<i64>)> =
        items.iter().map(|i| (i.event.clone(), i.id)).collect();
    assert_eq!(
        summary,
        vec![
            ("status".into(), Some(1)),
            ("heartbeat".into(), None),
            ("log".into(), Some(2)),
            ("end".into(), Some(3)),
        ]
    );
    assert_eq!(items[2].view.text.as_deref(), Some("hi\n"));
    assert!(items[3].is_end());
    let request = seen.0.lock().unwrap()[0].clone();
    assert!(request.contains(r#"("follow", "true")"#), "{request}");
    assert!(request.contains(r#"("after", "5")"#), "{request}");
    assert!(request.contains("accept=text/event-stream"), "{request}");
}

#[tokio::test]
async fn ndjson_events_are_parsed_line_by_line() {
    let addr = serve(Seen::default()).await;
    let client = TetherClient::new(&format!("http://{addr}"), None).unwrap();
    let views: Vec<_> = client
        .events_ndjson("r1", None, false)
        .map(Result::unwrap)
        .collect()
        .await;
    let kinds: Vec<&str> = views.iter().map(|v| v.kind.as_str()).collect();
    assert_eq!(kinds, vec!["status", "heartbeat", "end"]);
    assert_eq!(views[2].seq, Some(2));
}

#[tokio::test]
async fn an_unreachable_server_is_a_retryable_transport_error() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let client = TetherClient::new(&format!("http://{addr}"), None).unwrap();
    let err = client.list_workers().await.unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err:?}");
    assert!(err.is_retryable());
    let stream_err = client
        .events("r1", None, false)
        .next()
        .await
        .expect("one item")
        .unwrap_err();
    assert!(matches!(stream_err, ClientError::Transport(_)));
}
