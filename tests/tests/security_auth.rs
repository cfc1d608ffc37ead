//! Security round 3, the API's half (issue 20, findings 2, 6 and 7): every gRPC server wants a
//! token by default and settles it the same way, mTLS works for standalone services, secrets
//! that were exposed or planted are not trusted, and streams are bounded per connection and
//! per token. Real binaries on loopback, real clients.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use proto::registry::{FollowHistoryRequest, ListConnectionsRequest};
use tests::{Output, Proc, Registry, WAIT, bin};
use tokio::process::Command;
use tonic::Code;

type R = anyhow::Result<()>;

/// A registry URL nobody serves: intercept-svc and export-svc connect to theirs lazily.
const NO_REGISTRY: &str = "http://127.0.0.1:9";

/// A unary call every server answers (gRPC health), with `token` or none.
async fn health(url: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let channel = platform::client::connect(url, token)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(|_| ())
}

/// `BIN ARGS` with no token in its environment.
fn command(name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin(name));
    cmd.args(args)
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_TOKEN_FILE")
        // A refusal is one line: no backtrace appended to it.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    cmd
}

/// `BIN ARGS` run to completion: for a server expected to refuse to start.
async fn refused(name: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = tests::output(command(name, args)).await?;
    anyhow::ensure!(!out.ok, "{name} {args:?} started: {}", out.stdout);
    Ok(out)
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

/// Starts a standalone service (`intercept-svc`, `export-svc`) on a free loopback port.
async fn service(dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<(Proc, String)> {
    let mut all = vec!["--listen", "127.0.0.1:0", "--registry", NO_REGISTRY];
    all.extend_from_slice(args);
    let log = dir.join(format!("{name}.{}.log", std::process::id()));
    let proc = Proc::start(command(name, &all), log).await?;
    let url = format!("http://{}", proc.addr("listen")?);
    Ok((proc, url))
}

#[tokio::test]
async fn intercept_export_and_proxy_listen_require_a_token_by_default() -> R {
    let tmp = tempfile::tempdir()?;
    for name in ["intercept-svc", "export-svc"] {
        // No token and no data directory to keep one in: refused, in one sentence.
        let out = refused(
            name,
            &["--listen", "127.0.0.1:0", "--registry", NO_REGISTRY],
        )
        .await?;
        let err = out.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "{name} requires a token: pass --token or --token-file"
            )),
            "{err}"
        );

        // With a data directory: a token generated there (0600), named in the ready line,
        // required on every call.
        let data = tmp.path().join(name);
        let d = data.to_string_lossy().into_owned();
        let (proc, url) = service(tmp.path(), name, &["--data-dir", &d]).await?;
        let file = PathBuf::from(proc.field("token").context("token= in the ready line")?);
        assert_eq!(file, data.join("token"));
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&data), 0o700);
        let token = platform::token::read_file(&file)?;
        let err = health(&url, None).await.expect_err("no token");
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
        let err = health(&url, Some("guess")).await.expect_err("wrong token");
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
        health(&url, Some(&token)).await?;
        // Restarted on the same data directory: the same token.
        drop(proc);
        let (again, url) = service(tmp.path(), name, &["--data-dir", &d]).await?;
        assert_eq!(again.field("token"), Some(file.display().to_string()));
        health(&url, Some(&token)).await?;

        // --no-auth: the explicit opt-out, logged, loopback only.
        let (open, url) = service(tmp.path(), name, &["--no-auth"]).await?;
        assert_eq!(open.field("token"), None);
        health(&url, None).await?;
        assert!(
            open.stderr().contains("--no-auth: ") && open.stderr().contains("WARN"),
            "{}",
            open.stderr()
        );
        let out = refused(
            name,
            &[
                "--listen",
                "0.0.0.0:0",
                "--registry",
                NO_REGISTRY,
                "--no-auth",
            ],
        )
        .await?;
        assert!(
            out.stderr.contains("--no-auth is allowed on loopback only"),
            "{}",
            out.stderr
        );
    }

    // proxy-core's --listen is a server like the others.
    let data = tmp.path().join("proxy");
    let args = [
        "--socks",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--registry",
        NO_REGISTRY,
        "--data-dir",
    ];
    let mut cmd = command("proxy-core", &args);
    cmd.arg(&data);
    let proxy = Proc::start(cmd, tmp.path().join("proxy.log")).await?;
    let url = format!("http://{}", proxy.addr("grpc")?);
    let file = PathBuf::from(proxy.field("token").context("token=")?);
    assert_eq!(file, data.join("token"));
    assert_eq!(mode(&file), 0o600);
    let token = platform::token::read_file(&file)?;
    let err = health(&url, None).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut ca = proto::ca::certificate_authority_client::CertificateAuthorityClient::new(
        platform::client::connect(&url, None).await?,
    );
    let err = ca
        .regenerate_ca(proto::ca::RegenerateCaRequest {})
        .await
        .expect_err("anyone could replace the CA");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut ca = proto::ca::certificate_authority_client::CertificateAuthorityClient::new(
        platform::client::connect(&url, Some(&token)).await?,
    );
    let cert = ca
        .get_ca_certificate(proto::ca::GetCaCertificateRequest {})
        .await?
        .into_inner();
    assert!(cert.pem.starts_with("-----BEGIN CERTIFICATE-----"));
    Ok(())
}

/// `interpose ARGS` with only `env` from the caller's Interpose settings.
async fn interpose(xdg: &Path, args: &[&str]) -> anyhow::Result<Output> {
    tests::interpose_isolated(xdg, args, &[]).await
}

/// A registry, an intercept-svc and an export-svc on one data directory, all with
/// `--grpc-tls` and no token given: they share the token generated there and the management
/// CA, and the services reach the registry over mTLS with the local client certificate. A
/// client with a certificate from `interpose ca issue-client` (the CLI, a rustls client) is
/// served by each; one without is refused in one sentence.
#[tokio::test]
async fn standalone_intercept_and_export_svc_serve_mtls() -> R {
    let tmp = tempfile::tempdir()?;
    let xdg = tmp.path().join("xdg");
    std::fs::create_dir(&xdg)?;
    let data = tmp.path().join("data");
    let d = data.to_string_lossy().into_owned();
    let reg = Proc::start(
        command(
            "registry-svc",
            &["--listen", "127.0.0.1:0", "--grpc-tls", "--data-dir", &d],
        ),
        tmp.path().join("registry.log"),
    )
    .await?;
    let reg_url = format!("https://{}", reg.addr("listen")?);
    let token = reg.field("token").context("token=")?;
    let mut urls = Vec::new();
    for name in ["intercept-svc", "export-svc"] {
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--registry",
            &reg_url,
            "--grpc-tls",
            "--data-dir",
            &d,
        ];
        let proc =
            Proc::start(command(name, &args), tmp.path().join(format!("{name}.log"))).await?;
        assert_eq!(proc.field("token"), Some(token.clone()), "{}", proc.ready);
        assert_eq!(
            proc.field("mtls"),
            Some(data.join("mtls").display().to_string())
        );
        let url = format!("https://{}", proc.addr("listen")?);
        urls.push((proc, url));
    }

    let out_dir = tmp.path().join("alice");
    let o = out_dir.to_string_lossy().into_owned();
    let issued = interpose(
        &xdg,
        &[
            "ca",
            "issue-client",
            "--name",
            "alice",
            "--out",
            &o,
            "--data-dir",
            &d,
        ],
    )
    .await?;
    assert!(issued.ok, "{}", issued.stderr);
    let cert = out_dir.join("alice-cert.pem").display().to_string();
    let key = out_dir.join("alice-key.pem").display().to_string();
    let ca = out_dir.join("ca-cert.pem").display().to_string();
    let identity = [
        "--client-cert",
        cert.as_str(),
        "--client-key",
        key.as_str(),
        "--ca-cert",
        ca.as_str(),
        "--token-file",
        token.as_str(),
    ];
    let (intercept, export) = (&urls[0].1, &urls[1].1);

    // intercept-svc: a change and a status, over mTLS with the token.
    let on = [&["intercept", "on", "--server", intercept][..], &identity].concat();
    let out = interpose(&xdg, &on).await?;
    assert!(out.ok, "{}", out.stderr);
    let status = [
        &["intercept", "status", "--server", intercept][..],
        &identity,
    ]
    .concat();
    let out = interpose(&xdg, &status).await?;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.starts_with("intercept: on"), "{}", out.stdout);

    // export-svc: a capture, read from the registry over mTLS.
    let pcap = tmp.path().join("all.pcap");
    let p = pcap.to_string_lossy().into_owned();
    let export_args = [&["export", "--out", &p, "--server", export][..], &identity].concat();
    let out = interpose(&xdg, &export_args).await?;
    assert!(out.ok, "{}", out.stderr);
    let bytes = std::fs::read(&pcap)?;
    assert!(
        bytes.len() >= 24 && bytes[..4] == 0xa1b2_c3d4u32.to_le_bytes(),
        "a PCAP header"
    );

    // Without a client certificate each refuses, in one sentence.
    for url in [intercept, export] {
        let args = [
            "intercept",
            "status",
            "--server",
            url,
            "--ca-cert",
            &ca,
            "--token-file",
            &token,
        ];
        let out = interpose(&xdg, &args).await?;
        assert!(!out.ok, "{url}: {}", out.stdout);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr
                .starts_with("interpose: the server requires a client certificate"),
            "{}",
            out.stderr
        );
    }
    drop(reg);
    Ok(())
}

/// A token file found readable by other users is replaced by a new token at start (logged),
/// so whoever read it loses access; the old token is refused.
#[tokio::test]
async fn a_token_file_others_could_read_is_replaced_not_kept() -> R {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("reg");
    let reg = Registry::start(&data).await?;
    let file = data.join("token");
    let old = platform::token::read_file(&file)?;
    assert!(reg.proc.terminate().await?, "clean exit");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;

    let reg = Registry::start(&data).await?;
    let stderr = reg.proc.stderr();
    assert!(
        stderr.contains("WARN")
            && stderr.contains("the token file was readable by other users: replaced it"),
        "{stderr}"
    );
    let new = platform::token::read_file(&file)?;
    assert_ne!(new, old, "an exposed token is not kept");
    assert_eq!(mode(&file), 0o600);
    let mut stale = tests::registry_client(&reg.url, Some(&old)).await?;
    let err = stale
        .list_connections(ListConnectionsRequest::default())
        .await
        .expect_err("the old token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut fresh = tests::registry_client(&reg.url, Some(&new)).await?;
    fresh
        .list_connections(ListConnectionsRequest::default())
        .await?;

    // A token file that was already private is kept as it is.
    assert!(reg.proc.terminate().await?, "clean exit");
    let reg = Registry::start(&data).await?;
    assert_eq!(platform::token::read_file(&file)?, new);
    assert!(!reg.proc.stderr().contains("replaced it"));
    Ok(())
}

/// A data directory, a token or a key that belongs to another user is refused at start in
/// one sentence (only root can give files away, so the test needs root; elsewhere it says so
/// and checks the one case it can: a data directory of root's).
#[tokio::test]
async fn a_data_dir_or_secret_of_another_user_is_refused() -> R {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir()?;
    if std::fs::metadata("/proc/self")?.uid() != 0 {
        eprintln!("not root: only the data directory of another user (/) is tried");
        let out = registry_on(Path::new("/"), &[]).await?;
        assert!(out.stderr.contains("/ belongs to user 0"), "{}", out.stderr);
        return Ok(());
    }
    let nobody = Some(65_534);

    // The data directory itself.
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs)?;
    std::os::unix::fs::chown(&theirs, nobody, None)?;
    let out = registry_on(&theirs, &[]).await?;
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "{} belongs to user 65534, not to user 0 running this process: refusing to use it",
            theirs.display()
        )),
        "{}",
        out.stderr
    );

    // A token planted in a data directory of ours (e.g. while it was world-writable).
    let planted = tmp.path().join("planted");
    std::fs::create_dir(&planted)?;
    std::fs::write(planted.join("token"), "chosen-by-them\n")?;
    std::fs::set_permissions(
        planted.join("token"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    std::os::unix::fs::chown(planted.join("token"), nobody, None)?;
    let out = registry_on(&planted, &[]).await?;
    assert!(
        out.stderr.contains(&format!(
            "{} belongs to user 65534",
            planted.join("token").display()
        )),
        "{}",
        out.stderr
    );

    // A --token-file of another user (not root).
    let mine = tmp.path().join("mine");
    let given = tmp.path().join("given.token");
    std::fs::write(&given, "t0ken\n")?;
    std::os::unix::fs::chown(&given, nobody, None)?;
    let g = given.to_string_lossy().into_owned();
    let out = registry_on(&mine, &["--token-file", &g]).await?;
    assert!(
        out.stderr.contains(&format!(
            "the token file {g} belongs to user 65534, not to user 0 running this process or root"
        )),
        "{}",
        out.stderr
    );

    // A management CA key planted in an intercept-svc's data directory.
    let svc = tmp.path().join("svc");
    std::fs::create_dir_all(svc.join("mtls"))?;
    std::fs::write(svc.join("mtls/ca-key.pem"), "not theirs to give\n")?;
    std::os::unix::fs::chown(svc.join("mtls/ca-key.pem"), nobody, None)?;
    let s = svc.to_string_lossy().into_owned();
    let out = refused(
        "intercept-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--registry",
            NO_REGISTRY,
            "--grpc-tls",
            "--data-dir",
            &s,
        ],
    )
    .await?;
    assert!(
        out.stderr.contains(&format!(
            "{} belongs to user 65534",
            svc.join("mtls/ca-key.pem").display()
        )),
        "{}",
        out.stderr
    );
    Ok(())
}

/// registry-svc on `dir` with `extra`, expected to refuse to start.
async fn registry_on(dir: &Path, extra: &[&str]) -> anyhow::Result<Output> {
    let d = dir.to_string_lossy().into_owned();
    let args = [&["--listen", "127.0.0.1:0", "--data-dir", &d][..], extra].concat();
    refused("registry-svc", &args).await
}

/// Opens a `FollowHistory` stream on `client` and waits for its first event (an empty
/// registry answers `caught_up` at once), so the stream is known to be open.
async fn open_follow(
    client: &mut proto::registry::registry_client::RegistryClient<platform::client::AuthChannel>,
) -> Result<tonic::Streaming<proto::registry::FollowHistoryEvent>, tonic::Status> {
    let mut stream = client
        .follow_history(FollowHistoryRequest::default())
        .await?
        .into_inner();
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(Some(_))) => Ok(stream),
        Ok(Ok(None)) => Err(tonic::Status::internal("the stream ended")),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(tonic::Status::deadline_exceeded("no first event")),
    }
}

/// Streams are bounded per connection (64) and per token (512) by default: one beyond either
/// is refused at once with RESOURCE_EXHAUSTED naming the bound, unary calls keep being served
/// (also on a fresh channel), a closed stream gives its place back, and the registry's memory
/// stays bounded while a client keeps asking for more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_bounded_per_connection_and_per_token() -> R {
    use platform::streams::{DEFAULT_PER_CONNECTION, DEFAULT_PER_TOKEN};
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let pid = reg.proc.pid().context("pid")?;
    let per_conn = DEFAULT_PER_CONNECTION as usize;
    let per_token = DEFAULT_PER_TOKEN as usize;

    // One client (one channel, one connection) opens streams up to the limit...
    let mut first = reg.client().await?;
    let mut open = Vec::new();
    for i in 0..per_conn {
        open.push(
            open_follow(&mut first)
                .await
                .with_context(|| format!("stream {i}"))?,
        );
    }
    // ...and the next is refused, saying which bound.
    let err = open_follow(&mut first).await.expect_err("one beyond");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(
        err.message(),
        format!(
            "this connection already has {per_conn} streaming calls open, the most the server \
             allows (--max-streams-per-connection): end one first"
        )
    );
    // Unary calls on the same connection still work.
    first
        .list_connections(ListConnectionsRequest::default())
        .await?;

    // Other connections fill the token's share.
    let mut clients = Vec::new();
    while open.len() < per_token {
        let mut c = reg.client().await?;
        for _ in 0..per_conn.min(per_token - open.len()) {
            open.push(open_follow(&mut c).await?);
        }
        clients.push(c);
    }
    let mut fresh = reg.client().await?;
    let err = open_follow(&mut fresh)
        .await
        .expect_err("beyond the token's");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("--max-streams-per-token"),
        "{}",
        err.message()
    );
    // A unary call on a fresh channel is served while every stream place is taken.
    let mut unary = reg.client().await?;
    tokio::time::timeout(
        WAIT,
        unary.list_connections(ListConnectionsRequest::default()),
    )
    .await
    .context("a unary call while the streams are at their limit")??;

    // A client that keeps asking is refused each time; the registry's memory stays bounded.
    for _ in 0..2_000 {
        let err = open_follow(&mut fresh).await.expect_err("still full");
        assert_eq!(err.code(), Code::ResourceExhausted);
    }
    let rss = tests::stats::rss_bytes(pid).context("registry RSS")?;
    eprintln!(
        "registry RSS with {per_token} streams open, 2,000 refused: {} MiB",
        rss >> 20
    );
    // Generous: an idle registry is ~30 MB; each open follow costs a task and a small channel.
    assert!(rss < 400 << 20, "registry RSS {} MiB", rss >> 20);

    // A stream that ends gives its place back.
    drop(open.pop());
    tests::eventually("a stream place freed", || {
        let mut fresh = fresh.clone();
        async move { Ok(open_follow(&mut fresh).await.ok().map(|_| ())) }
    })
    .await?;
    drop(open);
    Ok(())
}

/// The bounds are flags of every server; a smaller one is enforced as given.
#[tokio::test]
async fn stream_bounds_are_flags() -> R {
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start_with(
        &tmp.path().join("reg"),
        "127.0.0.1:0",
        &[
            "--max-streams-per-connection",
            "2",
            "--max-streams-per-token",
            "3",
        ],
    )
    .await?;
    let mut a = reg.client().await?;
    let _s1 = open_follow(&mut a).await?;
    let _s2 = open_follow(&mut a).await?;
    let err = open_follow(&mut a)
        .await
        .expect_err("third on one connection");
    assert!(
        err.message().contains("already has 2 streaming calls"),
        "{err}"
    );
    let mut b = reg.client().await?;
    let _s3 = open_follow(&mut b).await?;
    let err = open_follow(&mut b).await.expect_err("fourth for the token");
    assert!(
        err.message().contains("already has 3 streaming calls"),
        "{err}"
    );
    let out = refused(
        "registry-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &tmp.path().join("zero").to_string_lossy(),
            "--max-streams-per-token",
            "0",
        ],
    )
    .await?;
    assert!(
        out.stderr.contains("--max-streams-per-token"),
        "{}",
        out.stderr
    );
    Ok(())
}
