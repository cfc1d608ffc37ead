//! Private by default, end to end: data directories and files are owner-only whatever the
//! umask, and the management API wants a token even on loopback, which the CLI finds.

use std::{os::unix::fs::PermissionsExt, path::Path};

use proto::registry::ListConnectionsRequest;
use tests::{Proc, Registry, Up, WAIT, interpose_json, proxy};
use tokio::{io::AsyncWriteExt, process::Command};
use tonic::Code;

type R = anyhow::Result<()>;

/// `interpose ARGS` with exactly the environment `env` adds (no token variables inherited).
async fn interpose_env(args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<tests::Output> {
    let mut cmd = Command::new(tests::bin("interpose"));
    cmd.args(args)
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_TOKEN_FILE")
        .env_remove("INTERPOSE_SERVER");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tests::output(cmd).await
}

#[tokio::test]
async fn up_keeps_its_data_dir_private_whatever_the_umask() -> R {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    // A data dir left readable by an older release: fixed at start (and logged).
    std::fs::create_dir(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(data.join("notes.txt"), "left by hand")?;
    std::fs::set_permissions(
        data.join("notes.txt"),
        std::fs::Permissions::from_mode(0o644),
    )?;

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"umask 022; exec "$0" up --socks 127.0.0.1:0 --grpc 127.0.0.1:0 --data-dir "$1""#)
        .arg(tests::bin("interpose"))
        .arg(&data)
        .env_remove("INTERPOSE_TOKEN");
    let up = Proc::start(cmd, tmp.path().join("up.log")).await?;
    assert!(up.stderr().contains("mode tightened"), "{}", up.stderr());
    let grpc = up.field("grpc").expect("grpc=");

    // Traffic, so that the history log, sled's files and the CA exist.
    let server = proxy::Server::bind().await?;
    let mut c = proxy::socks_connected(up.addr("socks")?, server.addr).await?;
    let mut s = server.accept().await?;
    c.write_all(b"secret plaintext").await?;
    proxy::read_n(&mut s, 16).await?;
    drop(c);
    drop(s);
    let token = up.field("token").expect("token=");
    tests::eventually("the history", || {
        let grpc = grpc.clone();
        let token = token.clone();
        async move {
            let out = interpose_env(
                &[
                    "history",
                    "--json",
                    "--server",
                    &grpc,
                    "--token-file",
                    &token,
                ],
                &[],
            )
            .await?;
            anyhow::ensure!(out.ok, "interpose history failed: {}", out.stderr);
            Ok(out.stdout.contains("c2s").then_some(()))
        }
    })
    .await?;
    tests::assert_private(&data);
    assert!(up.terminate().await?, "clean exit");
    // Also what was written at shutdown.
    tests::assert_private(&data);
    for f in [
        "token",
        "registry/history/000001.log",
        "ca/ca-key.pem",
        "ca/ca-cert.pem",
    ] {
        assert!(data.join(f).exists(), "{f}");
    }
    Ok(())
}

#[tokio::test]
async fn the_api_wants_a_token_even_on_loopback() -> R {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let up = Up::start(&data, &[]).await?;
    let token_file = up.proc.field("token").expect("ready line has token=");
    // token= comes last but for the web view's URL (appended after it).
    assert!(
        up.proc
            .ready
            .contains(&format!(" token={token_file} web=http://")),
        "{}",
        up.proc.ready
    );
    assert_eq!(Path::new(&token_file), data.join("token"));

    // No token: UNAUTHENTICATED, from a plain gRPC client.
    let ch = platform::client::connect(&up.grpc, None).await?;
    let mut anon = proto::registry::registry_client::RegistryClient::new(ch);
    let err = anon
        .list_connections(ListConnectionsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // The CLI: no token, a wrong one (one clear line), the token file.
    let none = interpose_env(&["conns", "list", "--server", &up.grpc], &[]).await?;
    assert!(!none.ok);
    assert!(none.stderr.contains("requires a token"), "{}", none.stderr);
    let wrong = interpose_env(
        &["conns", "list", "--server", &up.grpc, "--token", "x"],
        &[],
    )
    .await?;
    assert!(!wrong.ok);
    assert_eq!(wrong.stderr.lines().count(), 1, "{}", wrong.stderr);
    assert!(
        wrong
            .stderr
            .starts_with("interpose: not authorised: wrong token"),
        "{}",
        wrong.stderr
    );
    let args = ["conns", "list", "--json", "--server", &up.grpc];
    let by_flag = [&args[..], &["--token-file", &token_file]].concat();
    let out = interpose_env(&by_flag, &[]).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "[]");
    let out = interpose_env(&args, &[("INTERPOSE_TOKEN_FILE", Path::new(&token_file))]).await?;
    assert!(out.ok, "{}", out.stderr);
    let missing = [&args[..], &["--token-file", "/nonexistent/token"]].concat();
    let out = interpose_env(&missing, &[]).await?;
    assert!(!out.ok);
    assert!(out.stderr.contains("/nonexistent/token"), "{}", out.stderr);

    // A standalone registry does the same, and --no-auth is the logged opt-out.
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    assert!(reg.proc.field("token").is_some(), "{}", reg.proc.ready);
    let err = proto::registry::registry_client::RegistryClient::new(
        platform::client::connect(&reg.url, None).await?,
    )
    .list_connections(ListConnectionsRequest::default())
    .await
    .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    reg.client()
        .await?
        .list_connections(ListConnectionsRequest::default())
        .await?;
    let open =
        Registry::start_with(&tmp.path().join("open"), "127.0.0.1:0", &["--no-auth"]).await?;
    assert_eq!(open.proc.field("token"), None);
    assert!(
        open.proc.stderr().contains("--no-auth"),
        "{}",
        open.proc.stderr()
    );
    assert_eq!(
        interpose_json(&open.url, &["conns", "list", "--json"]).await?,
        serde_json::json!([])
    );
    Ok(())
}

#[tokio::test]
async fn the_cli_finds_the_default_data_dirs_token_by_itself() -> R {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    let xdg = tmp.path().join("xdg");
    let env = [("HOME", home.as_path()), ("XDG_DATA_HOME", xdg.as_path())];
    let mut cmd = Command::new(tests::bin("interpose"));
    cmd.args(["up", "--socks", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_TOKEN_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let up = Proc::start(cmd, tmp.path().join("up.log")).await?;
    let grpc = up.field("grpc").expect("grpc=");
    let token = up.field("token").expect("token=");
    assert_eq!(Path::new(&token), xdg.join("interpose/token"));
    tests::assert_private(&xdg.join("interpose"));

    // No token flags: the CLI sends the default data dir's token to the server `up` recorded.
    let out = interpose_env(&["conns", "list", "--json", "--server", &grpc], &env).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "[]");
    // The same server written without its scheme is the same server.
    let bare = grpc.trim_start_matches("http://");
    let out = interpose_env(&["conns", "list", "--json", "--server", bare], &env).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "[]");
    // Another user (another data home) has no token for it.
    let other = tmp.path().join("other");
    let env2 = [
        ("HOME", other.as_path()),
        ("XDG_DATA_HOME", other.as_path()),
    ];
    let out = interpose_env(&["conns", "list", "--server", &grpc], &env2).await?;
    assert!(!out.ok);
    assert!(out.stderr.contains("not authorised"), "{}", out.stderr);
    // And the default data dir's token goes to no other server.
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let out = interpose_env(&["conns", "list", "--server", &reg.url], &env).await?;
    assert!(!out.ok);
    assert!(out.stderr.contains("requires a token"), "{}", out.stderr);
    Ok(())
}

/// `ListConnectionsRequest` with `page_token` (field 3) as raw bytes, to send invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawListRequest {
    #[prost(bytes = "vec", tag = "3")]
    page_token: Vec<u8>,
}

#[tokio::test]
async fn bad_page_tokens_are_invalid_arguments_and_are_not_echoed_whole() -> R {
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(&tmp.path().join("reg")).await?;
    let mut client = reg.client().await?;
    let huge = "9x".repeat(512 * 1024);
    let err = client
        .list_connections(ListConnectionsRequest {
            page_token: huge.clone(),
            ..Default::default()
        })
        .await
        .expect_err("1 MiB token");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() < 200, "{}", err.message().len());
    assert!(
        err.message().starts_with("bad page token \"9x9x"),
        "{}",
        err.message()
    );
    assert!(
        err.message().ends_with("(1048576 bytes)"),
        "{}",
        err.message()
    );
    let err = client
        .search_history(proto::registry::SearchHistoryRequest {
            page_token: huge,
            ..Default::default()
        })
        .await
        .expect_err("1 MiB token");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() < 200, "{}", err.message().len());

    // Invalid UTF-8 in a string field: the caller's fault, not the server's.
    let mut grpc = tonic::client::Grpc::new(tests::channel(&reg.url, None).await?);
    grpc.ready().await?;
    let path =
        http::uri::PathAndQuery::from_static("/interpose.registry.v1.Registry/ListConnections");
    let res: Result<tonic::Response<proto::registry::ListConnectionsResponse>, _> = grpc
        .unary(
            tonic::Request::new(RawListRequest {
                page_token: vec![b'1', 0xff, 0xfe],
            }),
            path,
            proto::codec::ProstCodec::default(),
        )
        .await;
    let err = res.expect_err("invalid UTF-8");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("malformed"), "{}", err.message());
    // And it keeps serving.
    client
        .list_connections(ListConnectionsRequest::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn idle_grpc_connections_are_closed_and_streams_are_not_cut() -> R {
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start_with(
        &tmp.path().join("reg"),
        "127.0.0.1:0",
        &["--grpc-max-age", "1s"],
    )
    .await?;
    let addr = reg.proc.addr("listen")?;
    // A watch opened now outlives the bound.
    let mut client = reg.client().await?;
    let mut watch = client
        .watch_connections(proto::registry::WatchConnectionsRequest::default())
        .await?
        .into_inner();

    // An HTTP/2 client (it answers pings) that makes no call is closed at the bound (never
    // before it; how long after is the machine's business). (A
    // connection that never sends the HTTP/2 preface is not: see SECURITY.md.)
    let h2_idle = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let start = std::time::Instant::now();
        let (_send, conn) = h2::client::handshake(tcp).await?;
        tokio::time::timeout(WAIT, conn).await?.ok();
        anyhow::Ok(start.elapsed())
    };
    let t = h2_idle.await?;
    assert!(t >= std::time::Duration::from_millis(800), "{t:?}");

    // The watch, older than the bound, still delivers.
    let mut rc = reg.client().await?;
    let mut ingest = tests::Ingest::open(&mut rc, "n").await?;
    ingest
        .send_durable(vec![tests::events::open(5, 1, "h", 2)])
        .await?;
    loop {
        let ev = tokio::time::timeout(WAIT, watch.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
        if ev.id == 5 {
            break;
        }
    }
    Ok(())
}
