//! Driving the web view in Debian's chromium: checks for the tools (node, chromium, tshark)
//! with the documented opt-out, `npm ci` in web/ui when needed, and [`Page`], a line-based
//! JSON client of web/ui/tests/page.mjs (playwright-core). Used by the browser test and the
//! web benchmark.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

use crate::WAIT;

/// The web view's sources.
pub fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/ui")
}

/// Whether a command runs (`--version` style).
fn runs(program: &str, arg: &str) -> bool {
    std::process::Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The chromium to drive, or the reason there is none.
fn chromium() -> Result<String, String> {
    let path = std::env::var("INTERPOSE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if Path::new(&path).is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{path} is missing (.ci/run installs the Debian package chromium)"
        ))
    }
}

/// Checks node, chromium and tshark and installs web/ui's npm packages when missing.
/// `Ok(None)`: a tool is missing and `INTERPOSE_TEST_SKIP_MISSING_TOOLS=1` says to skip.
pub fn tools() -> anyhow::Result<Option<String>> {
    let mut missing = Vec::new();
    if !runs("node", "--version") {
        missing.push("node is not installed".to_string());
    }
    let chromium = chromium().map_err(|e| missing.push(e)).ok();
    if !runs("tshark", "--version") {
        missing.push("tshark is not installed".to_string());
    }
    if !missing.is_empty() {
        if std::env::var("INTERPOSE_TEST_SKIP_MISSING_TOOLS").is_ok_and(|v| v == "1") {
            eprintln!(
                "skipping the browser test (INTERPOSE_TEST_SKIP_MISSING_TOOLS=1): {}",
                missing.join("; ")
            );
            return Ok(None);
        }
        bail!(
            "the browser test needs: {} (set INTERPOSE_TEST_SKIP_MISSING_TOOLS=1 to skip it)",
            missing.join("; ")
        );
    }
    npm_ci()?;
    Ok(chromium)
}

/// `npm ci` in web/ui unless its packages are there (once per test process).
fn npm_ci() -> anyhow::Result<()> {
    static DONE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done
        || ui_dir()
            .join("node_modules/playwright-core/package.json")
            .is_file()
    {
        *done = true;
        return Ok(());
    }
    let out = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(ui_dir())
        .output()
        .context("running npm ci in web/ui (is npm installed?)")?;
    ensure!(
        out.status.success(),
        "npm ci in web/ui failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    *done = true;
    Ok(())
}

/// The page driver: node running web/ui/tests/page.mjs, one JSON command per line.
pub struct Page {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl Page {
    /// Starts node with the page driver and chromium at `chromium`; files go to `out`.
    pub async fn start(chromium: &str, out: &Path) -> anyhow::Result<Self> {
        let log = out.join("page.log");
        let mut child = Command::new("node")
            .arg("tests/page.mjs")
            .current_dir(ui_dir())
            .env("CHROMIUM", chromium)
            .env("OUT_DIR", out)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .kill_on_drop(true)
            .spawn()
            .context("starting node tests/page.mjs")?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut page = Self {
            child,
            stdin,
            lines,
            log,
        };
        let ready = page.answer("start chromium").await?;
        ensure!(ready == "ready", "unexpected first line {ready}");
        Ok(page)
    }

    async fn answer(&mut self, what: &str) -> anyhow::Result<Value> {
        // The page's own waits are bounded by 60 s; this bounds a hung browser.
        let line = tokio::time::timeout(Duration::from_secs(180), self.lines.next_line())
            .await
            .with_context(|| format!("the page driver did not answer {what}"))??;
        let Some(line) = line else {
            bail!(
                "the page driver exited during {what}: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        };
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("driver answer {line:?}"))?;
        if v["ok"] != true {
            bail!("page: {what}: {}", v["error"].as_str().unwrap_or("?"));
        }
        Ok(v["value"].clone())
    }

    /// Runs one command: `cmd` with its arguments.
    pub async fn call(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        let mut msg = args;
        if msg.is_null() {
            msg = json!({});
        }
        msg["cmd"] = json!(cmd);
        self.stdin.write_all(format!("{msg}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        self.answer(&msg.to_string()).await
    }

    /// Closes the browser and waits for node to exit.
    pub async fn quit(mut self) -> anyhow::Result<()> {
        let _ = self.call("quit", Value::Null).await;
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
        Ok(())
    }
}
