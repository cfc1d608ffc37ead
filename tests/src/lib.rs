//! Harness for the end-to-end tests: builds the workspace's binaries once, starts them as
//! real processes on loopback with temporary data directories, waits for their ready lines,
//! and kills them when dropped.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed expectation fails the test"
)]

pub mod bench_server;
pub mod browser;
pub mod dns_server;
pub mod http;
pub mod load;
pub mod pki;
pub mod proxy;

pub mod stats;
pub mod tls;
pub mod tools;
pub mod upstreams;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use platform::client::AuthChannel;
use proto::registry::registry_client::RegistryClient;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// How long any process gets to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The bound on every other wait in the tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// The folder holding the workspace's binaries for this build's profile.
fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/, bench binaries in target/<profile>/.
    let exe = std::env::current_exe().expect("own executable path");
    let dir = exe.parent().expect("executable folder");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile> folder").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The cargo target folder (`target/`).
pub fn target_dir() -> PathBuf {
    bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(bin_dir)
}

/// The path of a workspace binary, built (once per process) if needed, so that `cargo test`
/// alone is enough on a clean checkout.
///
/// Tests build with `--workspace --all-targets`: the same packages and targets, hence the
/// same feature unification, as `cargo test --workspace`, so after that command's own build
/// this finds everything fresh instead of rebuilding dependencies with other features.
/// Release benchmark binaries build the release binaries.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let release = bin_dir().file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "--workspace"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        // `cargo test` gives the test process the variables of the package under test; some
        // build scripts (ring's) rerun when they change, so the nested build would rebuild
        // them. The build sees the environment a plain `cargo build` in a shell would.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(is_package_variable) {
                cmd.env_remove(key);
            }
        }
        if release {
            cmd.args(["--bins", "--release"]);
        } else {
            cmd.arg("--all-targets");
        }
        let out = cmd
            .output()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "cargo build of the workspace binaries failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    bin_dir().join(name)
}

/// Whether `key` is one of the variables cargo sets for a package's own build or run (as
/// opposed to the configuration variables a user sets, such as `CARGO_TARGET_DIR`).
fn is_package_variable(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    EXACT.contains(&key) || key.starts_with("CARGO_PKG_") || key.starts_with("CARGO_BIN_EXE_")
}

/// A running child process, killed when dropped.
pub struct Proc {
    child: Child,
    /// The ready line it printed.
    pub ready: String,
    /// Its stderr, captured to a file for failure messages.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` and waits for a stdout line beginning with `ready`.
    pub async fn start(mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let err = std::fs::File::create(&log)?;
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("ready") {
                    return Ok(line);
                }
            }
            bail!("exited without a ready line")
        })
        .await;
        let ready = match ready {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => bail!("{e}; stderr: {}", std::fs::read_to_string(&log)?),
            Err(_) => bail!("no ready line within {READY_TIMEOUT:?}"),
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, ready, log })
    }

    /// The process ID (`None` once it was reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The socket address in `key=` of the ready line.
    pub fn addr(&self, key: &str) -> anyhow::Result<std::net::SocketAddr> {
        self.field(key)
            .with_context(|| format!("{key}= in the ready line"))?
            .parse()
            .with_context(|| format!("{key}= is not a socket address"))
    }

    /// The value of `key=` in the ready line.
    pub fn field(&self, key: &str) -> Option<String> {
        self.ready
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    }

    /// SIGKILL, as a crash would: nothing gets a chance to flush.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then wait for a clean exit; returns its success.
    pub async fn terminate(self) -> anyhow::Result<bool> {
        self.signal("TERM").await
    }

    /// Sends signal `name` (e.g. "INT"), then waits at most [`WAIT`] for the process to
    /// exit; returns its success.
    pub async fn signal(mut self, name: &str) -> anyhow::Result<bool> {
        if self.child.id().is_some() {
            self.send_signal(name)?;
        }
        let st = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .with_context(|| format!("still running {WAIT:?} after SIG{name}"))??;
        Ok(st.success())
    }

    /// Sends signal `name` (e.g. "STOP", which hangs it) without waiting for anything.
    pub fn send_signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("the process has exited")?;
        let st = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()?;
        anyhow::ensure!(st.success(), "kill -{name} {pid}");
        Ok(())
    }

    /// The process's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Every path under `root` (itself included) with its permission bits.
fn modes(root: &Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).expect("stat");
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).expect("readdir") {
                stack.push(e.expect("entry").path());
            }
        }
        out.push((p.display().to_string(), meta.permissions().mode() & 0o7777));
    }
    out
}

/// Asserts that every folder under `root` (itself included) is 0700 and every file 0600.
pub fn assert_private(root: &Path) {
    let all = modes(root);
    let loose: Vec<_> = all
        .iter()
        .filter(|(p, m)| {
            let is_dir = Path::new(p).is_dir();
            (is_dir && *m != 0o700) || (!is_dir && *m != 0o600)
        })
        .map(|(p, m)| format!("{p} {m:o}"))
        .collect();
    assert!(
        loose.is_empty(),
        "not private: {loose:?} (of {})",
        all.len()
    );
}

/// The token files of the servers the tests started, by gRPC URL: servers require a token by
/// default, and the harness passes it on to every client it starts or builds for that URL
/// (so tests need not handle tokens unless they are about them).
fn token_files() -> &'static std::sync::Mutex<std::collections::HashMap<String, PathBuf>> {
    static FILES: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, PathBuf>>,
    > = std::sync::OnceLock::new();
    FILES.get_or_init(Default::default)
}

/// Remembers the `token=` file of `proc`'s ready line for `url`.
fn remember_token(url: &str, proc: &Proc) {
    let mut files = token_files().lock().unwrap_or_else(|e| e.into_inner());
    match proc.field("token") {
        Some(file) => files.insert(url.to_string(), PathBuf::from(file)),
        None => files.remove(url),
    };
}

/// Records that the server at `url` takes the token in `file` (for servers whose ready line
/// does not name one, e.g. an export-svc or intercept-svc given a registry's token).
pub fn set_token_file(url: &str, file: Option<PathBuf>) {
    let mut files = token_files().lock().unwrap_or_else(|e| e.into_inner());
    match file {
        Some(file) => files.insert(url.to_string(), file),
        None => files.remove(url),
    };
}

/// The token file of the server at `url` (from its ready line), if it has one.
pub fn token_file(url: &str) -> Option<PathBuf> {
    let files = token_files().lock().unwrap_or_else(|e| e.into_inner());
    files.get(url).cloned()
}

/// The token of the server at `url`, if it has a token file.
pub fn token(url: &str) -> Option<String> {
    platform::token::read_file(&token_file(url)?).ok()
}

/// Whether this test binary is the PostgreSQL twin of a test file (`registry_pg` runs
/// `registry.rs`): then every registry the harness starts keeps its store in a database of
/// the throwaway cluster ([`pg_fixture::Cluster::shared`]) instead of its data directory.
pub fn on_postgres() -> bool {
    static PG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PG.get_or_init(|| {
        std::env::current_exe().ok().is_some_and(|exe| {
            exe.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit_once('-'))
                .is_some_and(|(target, _hash)| target.ends_with("_pg"))
        })
    })
}

/// The database of the registry keeping `data_dir`: a new one on first use, the same one
/// when the registry is restarted on the same data directory.
pub fn database_for(data_dir: &Path) -> anyhow::Result<String> {
    type Databases = std::sync::Mutex<std::collections::HashMap<PathBuf, String>>;
    static DATABASES: std::sync::OnceLock<Databases> = std::sync::OnceLock::new();
    let mut dbs = DATABASES
        .get_or_init(Databases::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(url) = dbs.get(data_dir) {
        return Ok(url.clone());
    }
    let url = pg_fixture::Cluster::shared().create_database()?;
    dbs.insert(data_dir.to_path_buf(), url.clone());
    Ok(url)
}

/// The count a query returns from the database of the registry keeping `data_dir`.
pub async fn pg_count(data_dir: &Path, sql: &'static str) -> anyhow::Result<u64> {
    pg_count_at(database_for(data_dir)?, sql).await
}

/// The count a query returns from the database at `url`.
pub async fn pg_count_at(url: String, sql: &'static str) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
        let n: i64 = client.query_one(sql, &[])?.get(0);
        Ok(n as u64)
    })
    .await?
}

/// A standalone `registry-svc` on a loopback port.
pub struct Registry {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Registry {
    /// Starts a registry keeping its store in `data_dir`.
    pub async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(data_dir, "127.0.0.1:0", &[]).await
    }

    /// Starts a registry on `listen` with extra arguments.
    pub async fn start_with(data_dir: &Path, listen: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let store = match on_postgres() {
            true => Some(database_for(data_dir)?),
            false => None,
        };
        Self::start_on(data_dir, store, listen, extra).await
    }

    /// Starts a replica on the database at `store` serving `token`, its own files in
    /// `data_dir`.
    pub async fn start_replica(data_dir: &Path, store: &str, token: &str) -> anyhow::Result<Self> {
        let store = Some(store.to_string());
        Self::start_on(data_dir, store, "127.0.0.1:0", &["--token", token]).await
    }

    /// Starts a registry keeping its records and history in the database at `store` (one
    /// of several replicas, when they share it), else in `data_dir`.
    pub async fn start_on(
        data_dir: &Path,
        store: Option<String>,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("registry-svc"));
        cmd.args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env_remove("INTERPOSE_TOKEN")
            .env_remove("INTERPOSE_STORE");
        if let Some(url) = store {
            cmd.env("INTERPOSE_STORE", url);
        }
        let proc = Proc::start(cmd, data_dir.with_extension("registry.log")).await?;
        let listen = proc.field("listen").context("listen= in ready line")?;
        let url = format!("http://{listen}");
        remember_token(&url, &proc);
        Ok(Self { url, proc })
    }

    /// A gRPC client of it.
    pub async fn client(&self) -> anyhow::Result<RegistryClient<AuthChannel>> {
        registry_client(&self.url, None).await
    }
}

/// A registry client for `url` sending `token`, or (`None`) the token of the server the
/// harness started at `url`, if any.
pub async fn registry_client(
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<RegistryClient<AuthChannel>> {
    Ok(RegistryClient::new(channel(url, token).await?).max_decoding_message_size(64 << 20))
}

/// The registry's connection statistics (`ConnectionStats`) at `url`.
pub async fn connection_stats(
    url: &str,
) -> anyhow::Result<proto::registry::ConnectionStatsResponse> {
    let mut client = registry_client(url, None).await?;
    Ok(client
        .connection_stats(proto::registry::ConnectionStatsRequest::default())
        .await?
        .into_inner())
}

/// A channel to `url` sending `token`, or (`None`) the token of the server the harness
/// started at `url`, if any.
pub async fn channel(url: &str, token: Option<&str>) -> anyhow::Result<AuthChannel> {
    let known = self::token(url);
    Ok(platform::client::connect(url, token.or(known.as_deref())).await?)
}

/// `interpose up` with every service in one process.
pub struct Up {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`
    pub grpc: String,
    pub data_dir: PathBuf,
}

impl Up {
    /// Starts `interpose up` on free loopback ports (the web view's too) with its data in
    /// `data_dir`.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(data_dir, extra, None).await
    }

    /// [`Up::start`] with the `RUST_LOG` filter `log`.
    pub async fn start_logging(data_dir: &Path, extra: &[&str], log: &str) -> anyhow::Result<Self> {
        Self::start_with(data_dir, extra, Some(log)).await
    }

    async fn start_with(
        data_dir: &Path,
        extra: &[&str],
        log: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("interpose"));
        if let Some(log) = log {
            cmd.env("RUST_LOG", log);
        }
        cmd.arg("up")
            .args([
                "--socks",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
                // (A test's own --web or --no-web, in `extra`, overrides this.)
                "--web",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env_remove("INTERPOSE_TOKEN");
        let proc = Proc::start(cmd, data_dir.with_extension("up.log")).await?;
        let grpc = proc.field("grpc").context("grpc= in ready line")?;
        remember_token(&grpc, &proc);
        Ok(Self {
            grpc,
            proc,
            data_dir: data_dir.to_path_buf(),
        })
    }
}

/// A standalone side service (`intercept-svc` or `export-svc`) on a free loopback port,
/// in front of the registry at `registry`.
pub struct Side {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Side {
    /// Starts `name` (`intercept-svc`, `export-svc`) with extra arguments; its log goes
    /// into `dir`. It takes the registry's token (as `--token`) and wants it from its own
    /// clients too, so the harness passes that token to clients of [`Side::url`].
    pub async fn start(
        name: &str,
        dir: &Path,
        registry: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_on(name, dir, "127.0.0.1:0", registry, extra).await
    }

    /// [`Side::start`] listening on `listen` (e.g. the address of one that was killed).
    pub async fn start_on(
        name: &str,
        dir: &Path,
        listen: &str,
        registry: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin(name));
        cmd.args(["--listen", listen, "--registry", registry])
            .args(extra)
            .env_remove("INTERPOSE_TOKEN");
        if let Some(token) = self::token(registry) {
            cmd.args(["--token", &token]);
        }
        let proc = Proc::start(cmd, dir.join(format!("{name}.log"))).await?;
        let url = format!("http://{}", proc.addr("listen")?);
        set_token_file(&url, token_file(registry));
        Ok(Self { proc, url })
    }
}

/// What a finished CLI run printed.
#[derive(Debug)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `interpose ARGS --server URL` to completion (bounded by [`WAIT`]), with the token
/// file of the server the harness started at `server` (if any) in `INTERPOSE_TOKEN_FILE`.
pub async fn interpose(server: &str, args: &[&str]) -> anyhow::Result<Output> {
    interpose_in(server, args, None).await
}

/// [`interpose`] with `COLUMNS=width`: how wide its tables may be.
pub async fn interpose_columns(server: &str, args: &[&str], width: u16) -> anyhow::Result<Output> {
    interpose_in(server, args, Some(width)).await
}

async fn interpose_in(server: &str, args: &[&str], width: Option<u16>) -> anyhow::Result<Output> {
    let mut cmd = Command::new(bin("interpose"));
    match width {
        Some(w) => cmd.env("COLUMNS", w.to_string()),
        None => cmd.env_remove("COLUMNS"),
    };
    cmd.args(args)
        .args(["--server", server])
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_TOKEN_FILE")
        .env_remove("INTERPOSE_SERVER");
    if let Some(file) = token_file(server) {
        cmd.env("INTERPOSE_TOKEN_FILE", file);
    }
    output(cmd).await
}

/// Runs `interpose ARGS` with nothing from the caller's Interpose settings: the
/// `INTERPOSE_*` server, token and mTLS variables removed and the default data directory
/// under `xdg` (`xdg/interpose`), plus `env`.
pub async fn interpose_isolated(
    xdg: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
) -> anyhow::Result<Output> {
    let mut cmd = Command::new(bin("interpose"));
    cmd.args(args).env("XDG_DATA_HOME", xdg).env("HOME", xdg);
    for var in [
        "INTERPOSE_SERVER",
        "INTERPOSE_TOKEN",
        "INTERPOSE_TOKEN_FILE",
        "INTERPOSE_CLIENT_CERT",
        "INTERPOSE_CLIENT_KEY",
        "INTERPOSE_CA_CERT",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    output(cmd).await
}

/// Runs an `interpose` command to completion (bounded by [`WAIT`]) with no stdin.
pub async fn output(mut cmd: Command) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .context("interpose did not finish in time")??;
    Ok(Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `cli` (an `interpose` binary) `export --out path` against `url` for benchmarks, with
/// the token of the server the harness started there; returns the seconds until the capture
/// was written and synced, and what the export said on stderr.
pub async fn timed_export(cli: &Path, url: &str, path: &Path) -> anyhow::Result<(f64, String)> {
    let start = std::time::Instant::now();
    let mut cmd = Command::new(cli);
    cmd.args(["export", "--server", url, "--out"])
        .arg(path)
        .env_remove("INTERPOSE_TOKEN");
    if let Some(file) = token_file(url) {
        cmd.env("INTERPOSE_TOKEN_FILE", file);
    }
    let out = cmd.output().await?;
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    anyhow::ensure!(out.status.success(), "interpose export: {said}");
    std::fs::File::open(path)?.sync_all()?;
    Ok((start.elapsed().as_secs_f64(), said))
}

/// Runs `interpose ARGS` and returns its stdout; a non-zero exit is an error with its stderr.
pub async fn interpose_ok(server: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = interpose(server, args).await?;
    if !out.ok {
        bail!("interpose {args:?} failed: {}", out.stderr);
    }
    Ok(out.stdout)
}

/// `interpose held list --json` once it shows exactly `n` held packets (bounded by [`WAIT`]).
pub async fn held_list(server: &str, n: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    eventually(&format!("{n} held packets"), || async {
        let v = interpose_json(server, &["held", "list", "--json"]).await?;
        let list = v.as_array().cloned().unwrap_or_default();
        Ok((list.len() == n).then_some(list))
    })
    .await
}

/// Runs `interpose ARGS --json` and parses stdout as JSON.
pub async fn interpose_json(server: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = interpose(server, args).await?;
    if !out.ok {
        bail!("interpose {args:?} failed: {}", out.stderr);
    }
    serde_json::from_str(&out.stdout).with_context(|| format!("parsing {:?}", out.stdout))
}

/// Polls `f` until it returns `Some`, at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy-side ingest stream to a registry, for driving it the way proxy-core does.
pub struct Ingest {
    tx: tokio::sync::mpsc::Sender<proto::registry::IngestRequest>,
    acks: tonic::Streaming<proto::registry::IngestAck>,
    node: String,
    seq: u64,
    acked: u64,
    /// Malformed events the registry reported skipping, and its first reason.
    pub rejected: (u64, String),
}

impl Ingest {
    /// Opens an ingest stream as proxy node `node`.
    pub async fn open(
        client: &mut RegistryClient<AuthChannel>,
        node: &str,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acks = client
            .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            tx,
            acks,
            node: node.to_string(),
            seq: 0,
            acked: 0,
            rejected: (0, String::new()),
        })
    }

    /// Sends a batch without waiting; returns its batch number.
    pub async fn send(&mut self, events: Vec<proto::registry::Event>) -> anyhow::Result<u64> {
        self.seq += 1;
        self.tx
            .send(proto::registry::IngestRequest {
                node: self.node.clone(),
                batch_seq: self.seq,
                events,
                losses: None,
                session: String::new(),
            })
            .await
            .context("ingest stream closed")?;
        Ok(self.seq)
    }

    /// Waits until batch `seq` is acknowledged.
    pub async fn wait_ack(&mut self, seq: u64) -> anyhow::Result<()> {
        while self.acked < seq {
            let ack = tokio::time::timeout(WAIT, self.acks.message())
                .await
                .context("no ack in time")??
                .context("ingest stream ended")?;
            self.acked = ack.batch_seq;
            if ack.rejected_events > 0 {
                if self.rejected.0 == 0 {
                    self.rejected.1 = ack.rejection;
                }
                self.rejected.0 += ack.rejected_events;
            }
        }
        Ok(())
    }

    /// Sends a history for benchmarks: `connections` connections from ID `first`, each
    /// `per_connection` bytes of `packet`-byte packets alternating in direction, then a FIN
    /// close; batches of 64 packets, 8 in flight; returns once all are acknowledged.
    pub async fn send_history(
        &mut self,
        first: u64,
        connections: u64,
        per_connection: usize,
        packet: usize,
    ) -> anyhow::Result<()> {
        const BATCH: usize = 64;
        const WINDOW: u64 = 8;
        let payload = proxy::payload(packet, 7);
        let mut last = 0;
        for id in first..first + connections {
            self.send_durable(vec![events::open(id, 40000, "bench.example", 80)])
                .await?;
            let packets = (per_connection / packet) as u64;
            for from in (0..packets).step_by(BATCH) {
                let evs = (from..(from + BATCH as u64).min(packets))
                    .map(|i| {
                        let dir = if i % 2 == 0 {
                            proto::common::Direction::C2s
                        } else {
                            proto::common::Direction::S2c
                        };
                        events::packet(id, i + 1, dir, &payload)
                    })
                    .collect();
                last = self.send(evs).await?;
                if last > WINDOW {
                    self.wait_ack(last - WINDOW).await?;
                }
            }
            last = self
                .send(vec![events::close(
                    id,
                    proto::common::ClosedBy::Client,
                    proto::common::CloseKind::Fin,
                    "bench",
                )])
                .await?;
        }
        self.wait_ack(last).await
    }

    /// Sends a batch and waits until it is durable.
    pub async fn send_durable(
        &mut self,
        events: Vec<proto::registry::Event>,
    ) -> anyhow::Result<()> {
        let seq = self.send(events).await?;
        self.wait_ack(seq).await
    }

    /// The acknowledgement stream's next error, if the server rejects the stream.
    pub async fn next_error(&mut self) -> anyhow::Result<tonic::Status> {
        loop {
            match tokio::time::timeout(WAIT, self.acks.message()).await? {
                Ok(Some(_)) => continue,
                Ok(None) => bail!("stream ended without an error"),
                Err(s) => return Ok(s),
            }
        }
    }
}

/// Event builders matching what proxy-core sends.
pub mod events {
    use bytes::Bytes;
    use proto::{
        common::{CloseKind, ClosedBy, ConnStatus, Connection, Direction, Packet},
        registry::{ConnectionClosed, Counters, Event, event::Kind},
    };

    /// An open event for connection `id` from `127.0.0.1:src` to `host:dst`.
    pub fn open(id: u64, src: u32, host: &str, dst: u32) -> Event {
        Event {
            kind: Some(Kind::Opened(Connection {
                id,
                src_ip: "127.0.0.1".into(),
                src_port: src,
                dst_host: host.into(),
                dst_ip: "127.0.0.1".into(),
                dst_port: dst,
                status: ConnStatus::Active as i32,
                opened_at: Some(proto::time::now()),
                ..Default::default()
            })),
        }
    }

    /// A close event.
    pub fn close(id: u64, by: ClosedBy, kind: CloseKind, reason: &str) -> Event {
        Event {
            kind: Some(Kind::Closed(ConnectionClosed {
                id,
                closed_at: Some(proto::time::now()),
                closed_by: by as i32,
                close_kind: kind as i32,
                reason: reason.into(),
                counters: Some(Counters::default()),
            })),
        }
    }

    /// A history packet.
    pub fn packet(conn_id: u64, seq: u64, direction: Direction, data: &[u8]) -> Event {
        Event {
            kind: Some(Kind::Packet(Packet {
                conn_id,
                seq,
                direction: direction as i32,
                ts: Some(proto::time::now()),
                data: Bytes::copy_from_slice(data),
                ..Default::default()
            })),
        }
    }

    /// A history packet that was forwarded as `sent` instead of the `received` bytes, or
    /// dropped (`sent` empty).
    pub fn edited_packet(
        conn_id: u64,
        seq: u64,
        direction: Direction,
        received: &[u8],
        sent: &[u8],
        dropped: bool,
    ) -> Event {
        Event {
            kind: Some(Kind::Packet(Packet {
                conn_id,
                seq,
                direction: direction as i32,
                ts: Some(proto::time::now()),
                data: Bytes::copy_from_slice(sent),
                original: Bytes::copy_from_slice(received),
                modified: true,
                dropped,
            })),
        }
    }
}
