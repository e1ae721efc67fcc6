//! A headless Chromium driven over WebDriver (chromedriver's HTTP JSON protocol, through
//! reqwest): enough to load the dashboard, read and poll its DOM, click, type, and keep
//! screenshots under `target/dashboard-screenshots/` for a reviewer.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tether_testkit::{eventually_every, poll_until};

use crate::cluster::{free_port, Proc};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    session: String,
    base: String,
    _driver: Proc,
}

/// Where screenshots go: `target/dashboard-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp
        .parent()
        .map(|target| target.join("dashboard-screenshots"))
        .unwrap_or(tmp);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a window of `width`×`height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the dashboard tests need Debian's chromium and chromium-driver \
             (apt-get install -y chromium chromium-driver; .ci/run installs them)"
        );
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Proc { child };
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        eventually_every(
            "chromedriver to get ready",
            Duration::from_secs(30),
            Duration::from_millis(100),
            async || match http.get(format!("{base}/status")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            },
        )
        .await;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--disable-extensions",
                         "--no-first-run", format!("--window-size={width},{height}")],
            },
        }}});
        let answer: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("a session")
            .json()
            .await
            .unwrap();
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_string();
        Browser {
            http,
            session,
            base,
            _driver: driver,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request
            .send()
            .await
            .expect("webdriver answers")
            .json()
            .await
            .unwrap();
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        let v = self
            .call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
        assert!(v.is_null(), "navigation failed: {v}");
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Polls `script` until it returns something other than null/false, failing after
    /// `within` with `what` and a screenshot.
    pub async fn wait_for(&self, what: &str, within: Duration, script: &str) -> Value {
        // Every 100 ms, not the kit's 20: each ask is a round trip through the renderer.
        let answer = poll_until(within, Duration::from_millis(100), async || {
            let v = self.js(script, json!([])).await;
            if v.is_null() || v == Value::Bool(false) || v.get("error").is_some() {
                Err(v)
            } else {
                Ok(v)
            }
        })
        .await;
        match answer {
            Ok(v) => v,
            Err(last) => {
                self.screenshot(&format!("failed-{}", what.replace(' ', "-")))
                    .await;
                panic!("timed out waiting for {what}; last answer: {last}");
            }
        }
    }

    /// Finds the element, retrying while it is absent or the browser is too busy to answer
    /// (a loaded machine can make the renderer time out).
    async fn element(&self, css: &str) -> String {
        eventually_every(
            &format!("element {css}"),
            Duration::from_secs(30),
            Duration::from_millis(200),
            async || {
                let v = self
                    .call(
                        reqwest::Method::POST,
                        "/element",
                        Some(json!({"using": "css selector", "value": css})),
                    )
                    .await;
                v[ELEMENT].as_str().map(str::to_string).ok_or(v)
            },
        )
        .await
    }

    /// Clicks the element as a user would (WebDriver's element click).
    /// The page re-renders on live updates, so an element found a moment ago may be replaced
    /// before the click lands: then it is found again and clicked again, within a deadline.
    pub async fn click(&self, css: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let el = self.element(css).await;
            let v = self
                .call(
                    reqwest::Method::POST,
                    &format!("/element/{el}/click"),
                    Some(json!({})),
                )
                .await;
            if v.is_null() {
                return;
            }
            let replaced = v["error"] == "stale element reference";
            assert!(
                replaced && std::time::Instant::now() < deadline,
                "click on {css} failed: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `text` into the element.
    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.element(css).await;
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/element/{el}/value"),
                Some(json!({ "text": text })),
            )
            .await;
        assert!(v.is_null(), "typing into {css} failed: {v}");
    }

    /// Saves a PNG of the window as `target/dashboard-screenshots/NAME.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap_or_default();
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session, and with it Chromium, before chromedriver is killed; a plain
        // blocking request, since Drop cannot await.
        use std::io::{Read, Write};
        let Some(addr) = self.base.strip_prefix("http://") else {
            return;
        };
        if let Ok(mut socket) = std::net::TcpStream::connect(addr) {
            let _ = socket.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                self.session
            );
            if socket.write_all(request.as_bytes()).is_ok() {
                let mut answer = Vec::new();
                let _ = socket.read_to_end(&mut answer);
            }
        }
    }
}
