//! The dashboard in a real headless Chromium, against real `tether server` and `tether worker`
//! processes. Screenshots land in `target/dashboard-screenshots/`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::browser::Browser;
use crate::cluster::{id, Cluster};

const WIDE: (u32, u32) = (1400, 900);
const NARROW: (u32, u32) = (420, 900);
const PATIENCE: Duration = Duration::from_secs(30);

fn text_of(css: &str) -> String {
    format!("const el = document.querySelector({css:?}); return el ? el.textContent : null;")
}

#[tokio::test]
async fn a_run_shows_in_the_list_its_log_live_goes_quiet_and_cancels() {
    let mut c = Cluster::sqlite();
    c.start_server(&["--heartbeat-interval", "1s", "--stale-after", "10s"])
        .await;
    let _w = c.worker("builder-1", "2", &[]);
    c.wait_workers(1).await;
    let browser = Browser::start(WIDE.0, WIDE.1).await;
    browser.goto(&format!("{}/#/runs", c.base())).await;

    // One line a second, a warning on stderr, then silence.
    let run = c
        .submit(json!({
            "command": ["sh", "-c", "for i in 1 2 3 4 5; do echo \"tick $i\"; sleep 1; done; echo 'careful now' >&2; exec sleep 751"],
            "labels": {"team": "infra"},
        }))
        .await;
    let run_id = id(&run);
    let row = format!("tr[data-run-id=\"{run_id}\"]");
    browser
        .wait_for(
            "the run in the list",
            PATIENCE,
            &format!("return document.querySelector({row:?}) !== null;"),
        )
        .await;
    let short = browser.js(&text_of(&format!("{row} a")), json!([])).await;
    let expected = format!("{}…{}", &run_id[..8], &run_id[run_id.len() - 4..]);
    assert_eq!(short, Value::String(expected), "a short id");
    browser.screenshot("runs-wide").await;

    browser.click(&format!("{row} a")).await;
    let log = text_of("#log");
    let first = browser
        .wait_for(
            "the first line",
            PATIENCE,
            &format!(
                "const t = (function(){{ {log} }})(); return t && t.includes('tick 1') ? t : null;"
            ),
        )
        .await;
    assert!(
        !first.as_str().unwrap_or_default().contains("tick 5"),
        "lines show as they are printed, not at the end: {first}"
    );
    browser
        .wait_for(
            "alive while it prints",
            PATIENCE,
            "const b = document.querySelector('#run-liveness [data-liveness]'); return b && b.dataset.liveness === 'alive';",
        )
        .await;
    browser
        .wait_for(
            "the last line",
            PATIENCE,
            &format!("const t = (function(){{ {log} }})(); return t && t.includes('tick 5');"),
        )
        .await;
    let stderr = browser
        .wait_for("stderr kept apart", PATIENCE, &text_of("#log .stderr"))
        .await;
    assert!(stderr.as_str().unwrap_or_default().contains("careful now"));
    let stdout_in_stderr = browser
        .js(
            "return [...document.querySelectorAll('#log .stderr')].some(e => e.textContent.includes('tick'));",
            json!([]),
        )
        .await;
    assert_eq!(stdout_in_stderr, Value::Bool(false));
    browser
        .wait_for(
            "the badge to turn quiet",
            PATIENCE,
            "const b = document.querySelector('#run-liveness [data-liveness]'); return b && b.dataset.liveness === 'quiet';",
        )
        .await;
    let quiet_for = browser.js(&text_of("#quiet-for"), json!([])).await;
    assert!(
        quiet_for.as_str().is_some_and(|t| t.ends_with(" s")),
        "quiet for: {quiet_for}"
    );
    let worker = browser
        .js(&text_of("#attempts .worker-name"), json!([]))
        .await;
    assert_eq!(
        worker,
        Value::String("builder-1".into()),
        "attempts name their worker"
    );
    browser.screenshot("run-quiet-wide").await;
    browser.resize(NARROW.0, NARROW.1).await;
    browser.screenshot("run-quiet-narrow").await;
    browser.resize(WIDE.0, WIDE.1).await;

    browser.click("#cancel").await;
    browser
        .wait_for(
            "the run to end cancelled",
            PATIENCE,
            "const b = document.querySelector('#run-status [data-status]'); return b && b.dataset.status === 'cancelled';",
        )
        .await;
    assert_eq!(c.run(&run_id).await["status"], "cancelled");
    browser.screenshot("run-cancelled").await;
}

#[tokio::test]
async fn the_status_filter_and_search_narrow_the_list() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let _w = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;
    let mut succeeded = Vec::new();
    for i in 0..2 {
        succeeded.push(id(&c
            .submit(json!({"command": ["echo", format!("build {i}")]}))
            .await));
    }
    let failed = id(&c.submit(json!({"command": ["sh", "-c", "exit 3"]})).await);
    for run in succeeded.iter().chain([&failed]) {
        c.wait_terminal(run, PATIENCE).await;
    }

    let browser = Browser::start(WIDE.0, WIDE.1).await;
    browser.goto(&format!("{}/#/runs", c.base())).await;
    let count = "return document.querySelectorAll('#runs-table tr[data-run-id]').length;";
    browser
        .wait_for(
            "three runs",
            PATIENCE,
            &format!("return (function(){{ {count} }})() === 3;"),
        )
        .await;
    browser
        .click("#filter-status option[value=\"failed\"]")
        .await;
    let only = browser
        .wait_for(
            "only the failed run",
            PATIENCE,
            "const rows = [...document.querySelectorAll('#runs-table tr[data-run-id]')]; \
             return location.hash.includes('status=failed') && rows.length === 1 ? rows[0].dataset.runId : null;",
        )
        .await;
    assert_eq!(only, Value::String(failed.clone()));
    browser.screenshot("runs-filtered-failed").await;

    // Search by an id prefix, across every status.
    browser.click("#filter-status option[value=\"\"]").await;
    browser
        .wait_for(
            "the filter cleared",
            PATIENCE,
            &format!(
                "return !location.hash.includes('status=') && (function(){{ {count} }})() === 3;"
            ),
        )
        .await;
    // UUIDv7 ids of runs made together share their first characters: type past them.
    browser.type_into("#filter-q", &succeeded[1][..30]).await;
    let found = browser
        .wait_for(
            "the run by id prefix",
            PATIENCE,
            "const rows = [...document.querySelectorAll('#runs-table tr[data-run-id]')]; \
             return location.hash.includes('q=') && rows.length === 1 ? rows[0].dataset.runId : null;",
        )
        .await;
    assert_eq!(found, Value::String(succeeded[1].clone()));

    // The other views render what the API says.
    browser.goto(&format!("{}/#/workers", c.base())).await;
    let state = browser
        .wait_for(
            "the worker",
            PATIENCE,
            &text_of("#workers-table tr[data-worker-id] .badge"),
        )
        .await;
    assert_eq!(state, Value::String("active".into()));
    browser.screenshot("workers-wide").await;
    browser.goto(&format!("{}/#/lanes", c.base())).await;
    browser
        .wait_for(
            "the default lane",
            PATIENCE,
            "return document.querySelector('#lanes-table tr[data-lane=\"default\"]') !== null;",
        )
        .await;
    browser.screenshot("lanes-wide").await;
    for (path, body) in [
        (
            "/v1/pools/cache",
            json!({"fallback_url": "https://cache.example.com", "freshness_s": 120}),
        ),
        (
            "/v1/endpoints/cache-1",
            json!({"pool": "cache", "url": "http://10.0.0.7:8080", "kind": "always_ready"}),
        ),
    ] {
        let r = c
            .http
            .put(format!("{}{path}", c.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    browser.goto(&format!("{}/#/endpoints", c.base())).await;
    let hands_out = browser
        .wait_for(
            "what the pool hands out",
            PATIENCE,
            &text_of("#pools-table tr[data-pool=\"cache\"] code"),
        )
        .await;
    assert_eq!(hands_out, Value::String("http://10.0.0.7:8080".into()));
    browser.screenshot("endpoints-wide").await;
    browser.goto(&format!("{}/#/runs", c.base())).await;
    browser.resize(NARROW.0, NARROW.1).await;
    browser
        .wait_for(
            "three runs, narrow",
            PATIENCE,
            &format!("return (function(){{ {count} }})() === 3;"),
        )
        .await;
    browser.screenshot("runs-narrow").await;
}

#[tokio::test]
async fn a_token_protected_server_asks_for_the_token_then_shows_runs() {
    let mut c = Cluster::sqlite();
    c.start_server(&[
        "--api-token",
        "client-secret",
        "--worker-token",
        "worker-secret",
    ])
    .await;
    let r = c
        .http
        .post(format!("{}/v1/runs", c.base()))
        .bearer_auth("client-secret")
        .json(&json!({"command": ["echo", "behind a token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let run_id = id(&r.json::<Value>().await.unwrap());

    let browser = Browser::start(WIDE.0, WIDE.1).await;
    browser.goto(&format!("{}/#/runs", c.base())).await;
    browser
        .wait_for(
            "the token prompt",
            PATIENCE,
            "return !document.querySelector('#token-dialog').hidden;",
        )
        .await;
    browser.screenshot("token-prompt").await;
    // A wrong token is refused and asked for again.
    browser.type_into("#token-input", "wrong").await;
    browser.click("#token-submit").await;
    browser
        .wait_for(
            "the refusal",
            PATIENCE,
            "const d = document.querySelector('#token-dialog'); const e = document.querySelector('#token-error'); return !d.hidden && !e.hidden;",
        )
        .await;
    browser.type_into("#token-input", "client-secret").await;
    browser.click("#token-submit").await;
    let row = format!("tr[data-run-id=\"{run_id}\"]");
    browser
        .wait_for(
            "the run behind the token",
            PATIENCE,
            &format!("return document.querySelector('#token-dialog').hidden && document.querySelector({row:?}) !== null;"),
        )
        .await;
    // Kept for the session: a reload does not ask again.
    browser.goto(&format!("{}/#/runs", c.base())).await;
    browser
        .wait_for(
            "the run after a reload",
            PATIENCE,
            &format!("return document.querySelector({row:?}) !== null;"),
        )
        .await;
    let asked = browser
        .js(
            "return !document.querySelector('#token-dialog').hidden;",
            json!([]),
        )
        .await;
    assert_eq!(asked, Value::Bool(false));
    browser.screenshot("runs-with-token").await;
}

#[tokio::test]
async fn a_fifty_megabyte_log_shows_its_tail_and_loads_earlier_parts() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let _w = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;
    let run = c
        .submit(json!({"command": ["sh", "-c", "yes 'a line of build output, long enough to count' | head -c 52428800; echo THE-END"]}))
        .await;
    let run_id = id(&run);
    let done = c.wait_terminal(&run_id, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let browser = Browser::start(WIDE.0, WIDE.1).await;
    browser.goto(&format!("{}/#/runs/{run_id}", c.base())).await;
    browser
        .wait_for(
            "the tail",
            PATIENCE,
            "const t = document.querySelector('#log')?.textContent; return t && t.includes('THE-END');",
        )
        .await;
    let shown = "return document.querySelector('#log').textContent.length;";
    let tail = browser.js(shown, json!([])).await.as_u64().unwrap_or(0);
    assert!(
        tail < 1_000_000,
        "only the tail is in the page, not 50 MB: {tail}"
    );
    // The page answers at once: it is not busy with the log.
    let started = std::time::Instant::now();
    browser.js("return 1;", json!([])).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    browser.click("#log-earlier").await;
    browser
        .wait_for(
            "an earlier part",
            PATIENCE,
            &format!("return document.querySelector('#log').textContent.length > {tail};"),
        )
        .await;
    browser.screenshot("run-big-log").await;
}

#[tokio::test]
async fn the_live_log_resumes_after_the_server_restarts_without_loss_or_repeat() {
    let mut c = Cluster::sqlite();
    let base = c.start_server(&[]).await;
    let listen = base.trim_start_matches("http://").to_string();
    let _w = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;
    let run = c
        .submit(json!({"command": ["sh", "-c", "for i in $(seq 1 16); do echo \"line $i\"; sleep 0.5; done"]}))
        .await;
    let run_id = id(&run);
    let browser = Browser::start(WIDE.0, WIDE.1).await;
    browser.goto(&format!("{base}/#/runs/{run_id}")).await;
    browser
        .wait_for(
            "the first lines",
            PATIENCE,
            "const t = document.querySelector('#log')?.textContent; return t && t.includes('line 3');",
        )
        .await;

    // The server dies mid-stream and comes back on the same address and database.
    let (_, server) = c.servers.remove(0);
    server.kill9();
    let mut args = vec!["server", "--listen", &listen, "--database", &c.database];
    args.extend(crate::cluster::fast_except(&[]));
    let server = crate::cluster::spawn(&args, c.dir.path());
    crate::cluster::wait_ready(&c.http, &base).await;
    c.servers.push((base.clone(), server));

    let done = c.wait_terminal(&run_id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let stored = String::from_utf8(c.logs(&run_id).await).unwrap();
    let shown = browser
        .wait_for(
            "the whole log after the reconnect",
            PATIENCE,
            &format!(
                "const t = document.querySelector('#log')?.textContent; return t && t.length >= {} ? t : null;",
                stored.chars().count()
            ),
        )
        .await;
    assert_eq!(
        shown.as_str().unwrap_or_default(),
        stored,
        "the page shows what the server stored: nothing lost, nothing twice"
    );
    browser
        .wait_for(
            "the end of the run",
            PATIENCE,
            "const b = document.querySelector('#run-status [data-status]'); return b && b.dataset.status === 'succeeded';",
        )
        .await;
    browser.screenshot("run-after-reconnect").await;
}
