//! Several registry URLs: proxy-core, export-svc and intercept-svc given `--registry A,B` go
//! on with B when A is dead or dies (SIGKILL), and a proxy replays to B what A never
//! acknowledged. Mostly A and B are separate standalone registries (each its own sled
//! store) sharing one token, so what reaches B is exactly what the proxy sent after losing
//! A; one test runs them as replicas of one PostgreSQL database, where nothing may show
//! twice.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context, ensure};
use platform::client::AuthChannel;
use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Direction, Packet},
    intercept::{
        ForwardRequest, GetStatusRequest, HoldRequest, InterceptConfig, ListHeldRequest,
        SetConfigRequest,
        intercept_client::InterceptClient,
        verdict::{Action, Reason},
    },
    registry::registry_client::RegistryClient,
};
use tests::{
    Ingest, Proc, Registry, bin, events, interpose,
    proxy::{
        ProxyProc, history, payload, read_n, socks_connected, wait_conn_by_port, wait_history,
    },
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    process::Command,
};

/// One connection through the proxy: its client port (the record's `src_port`) and the
/// bytes sent so far (echoed, so both directions' history).
struct Conn {
    stream: TcpStream,
    port: u16,
    sent: Vec<u8>,
}

impl Conn {
    async fn open(socks: SocketAddr, echo: SocketAddr) -> anyhow::Result<Self> {
        let stream = socks_connected(socks, echo).await?;
        let port = stream.local_addr()?.port();
        Ok(Self {
            stream,
            port,
            sent: Vec::new(),
        })
    }

    /// Sends `data` and reads its echo.
    async fn exchange(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(data).await?;
        let back = read_n(&mut self.stream, data.len()).await?;
        ensure!(back == data, "the echo differs from what was sent");
        self.sent.extend_from_slice(data);
        Ok(())
    }

    /// One exchange of `n` bytes, then closes; returns the connection.
    async fn whole(
        socks: SocketAddr,
        echo: SocketAddr,
        n: usize,
        salt: u8,
    ) -> anyhow::Result<Self> {
        let mut c = Self::open(socks, echo).await?;
        c.exchange(&payload(n, salt)).await?;
        c.stream.shutdown().await?;
        Ok(c)
    }
}

/// Waits until `registry` holds `c`'s record, closed by the client with a FIN, and its
/// history exactly (every byte both ways, sequence numbers 1, 2, ... without a gap).
async fn assert_recorded(
    registry: &mut RegistryClient<AuthChannel>,
    c: &Conn,
    name: &str,
) -> anyhow::Result<()> {
    let rec = wait_conn_by_port(registry, c.port, "closed by the client", |r| {
        r.status == ConnStatus::Disconnected as i32
    })
    .await
    .with_context(|| format!("{name} (port {})", c.port))?;
    assert_eq!(
        (rec.closed_by, rec.close_kind),
        (ClosedBy::Client as i32, CloseKind::Fin as i32),
        "{name}: {rec:?}"
    );
    assert_eq!(rec.bytes_c2s, c.sent.len() as u64, "{name}");
    wait_history(registry, rec.id, &c.sent, &c.sent)
        .await
        .with_context(|| format!("{name}: history of {}", rec.id))?;
    Ok(())
}

/// Two standalone registries sharing A's token, keeping their data in the database at
/// `store` when given (then they are replicas of one registry), else each in its own
/// directory; returns (A, B).
async fn two_registries(dir: &Path, store: Option<String>) -> anyhow::Result<(Registry, Registry)> {
    let a = Registry::start_on(&dir.join("a"), store.clone(), "127.0.0.1:0", &[]).await?;
    let token = tests::token_file(&a.url).context("registry A's token file")?;
    let token_arg = token.display().to_string();
    let b = Registry::start_on(
        &dir.join("b"),
        store,
        "127.0.0.1:0",
        &["--token-file", &token_arg],
    )
    .await?;
    Ok((a, b))
}

/// A URL on which nothing listens: the port was bound and freed.
async fn dead_url() -> anyhow::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(format!("http://{}", l.local_addr()?))
}

/// Connections through a proxy whose registry `a` answers, then hangs (SIGSTOP: nothing
/// more is acknowledged), then dies (SIGKILL), by phase.
struct Phases {
    /// Recorded by A before it hung.
    before: Conn,
    /// Run whole while A hung.
    unacked: Vec<Conn>,
    /// Opened while A hung, ended after it died.
    spanning: Vec<Conn>,
    /// Run whole after A died.
    after: Vec<Conn>,
}

impl Phases {
    async fn run(socks: SocketAddr, echo: SocketAddr, a: Registry) -> anyhow::Result<Self> {
        let before = Conn::whole(socks, echo, 3_000, 1).await?;
        assert_recorded(&mut a.client().await?, &before, "before").await?;
        a.proc.send_signal("STOP")?;
        let mut unacked = Vec::new();
        for i in 0..2 {
            unacked.push(Conn::whole(socks, echo, 5_000, 10 + i).await?);
        }
        let mut spanning = Vec::new();
        for i in 0..2 {
            let mut c = Conn::open(socks, echo).await?;
            c.exchange(&payload(2_000, 20 + i)).await?;
            spanning.push(c);
        }
        // A crashes with all of that unacknowledged. The proxy goes on relaying.
        a.proc.kill().await;
        let mut after = Vec::new();
        for i in 0..3 {
            after.push(Conn::whole(socks, echo, 4_000, 30 + i).await?);
        }
        for (i, c) in spanning.iter_mut().enumerate() {
            c.exchange(&payload(1_500, 40 + i as u8)).await?;
            c.stream.shutdown().await?;
        }
        Ok(Self {
            before,
            unacked,
            spanning,
            after,
        })
    }

    /// The connections A never acknowledged (it hung, then died) and those after, named.
    fn since_a_hung(&self) -> impl Iterator<Item = (&Conn, &'static str)> {
        let unacked = self.unacked.iter().map(|c| (c, "unacknowledged by A"));
        let spanning = self.spanning.iter().map(|c| (c, "open across A's death"));
        let after = self.after.iter().map(|c| (c, "opened after A's death"));
        unacked.chain(spanning).chain(after)
    }
}

/// Asserts that `registry` holds each record once, its packets each once.
async fn assert_no_duplicates(
    registry: &mut RegistryClient<AuthChannel>,
    records: usize,
) -> anyhow::Result<()> {
    let all = tests::proxy::all_connections(registry).await?;
    assert_eq!(all.len(), records, "one record per connection: {all:?}");
    let mut ports: Vec<u32> = all.iter().map(|r| r.src_port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), records, "one record per client port: {all:?}");
    for rec in &all {
        let h = history(registry, rec.id).await?;
        let mut seqs: Vec<u64> = h.iter().map(|p| p.seq).collect();
        seqs.dedup();
        assert_eq!(seqs.len(), h.len(), "no packet twice in {}", rec.id);
    }
    Ok(())
}

/// Asserts the proxy logged its move from `a` to `b` and a replay of something.
fn assert_failover_logged(proxy: &ProxyProc, a: &str, b: &str) -> anyhow::Result<()> {
    let log = proxy.proc.stderr();
    let failover = log
        .lines()
        .find(|l| l.contains("failover:"))
        .with_context(|| format!("no failover line in the proxy's log:\n{log}"))?;
    assert!(failover.contains(a) && failover.contains(b), "{failover}");
    let replay = log
        .lines()
        .find(|l| l.contains("replaying"))
        .with_context(|| format!("no replay line in the proxy's log:\n{log}"))?;
    assert!(!replay.contains("replaying 0 "), "{replay}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_fails_over_to_the_next_registry_and_replays_what_the_dead_one_never_acknowledged()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = two_registries(dir.path(), None).await?;
    let echo = tests::proxy::echo_server().await?;
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let proxy =
        ProxyProc::start(dir.path(), &format!("{a_url},{b_url}"), "failover-1", &[]).await?;
    let phases = Phases::run(proxy.socks, echo, a).await?;
    // B (a store of its own) has every connection A never acknowledged and every one
    // after, complete, once; A had the first.
    let mut reg_b = b.client().await?;
    for (c, name) in phases.since_a_hung() {
        assert_recorded(&mut reg_b, c, name).await?;
    }
    assert_no_duplicates(&mut reg_b, 7).await?;
    assert_failover_logged(&proxy, &a_url, &b_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_one_database_lose_nothing_and_record_nothing_twice_when_one_dies()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = pg_fixture::Cluster::shared().create_database()?;
    let (a, b) = two_registries(dir.path(), Some(db)).await?;
    let echo = tests::proxy::echo_server().await?;
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let registries = format!("{a_url},{b_url}");
    let proxy = ProxyProc::start(dir.path(), &registries, "failover-pg", &[]).await?;
    let phases = Phases::run(proxy.socks, echo, a).await?;
    // One database: B shows everything, what A recorded before it hung included, each
    // connection once with a unique ID and its whole history once, whatever A applied
    // without acknowledging and the proxy replayed.
    let mut reg_b = b.client().await?;
    let all = std::iter::once((&phases.before, "before")).chain(phases.since_a_hung());
    for (c, name) in all {
        assert_recorded(&mut reg_b, c, name).await?;
    }
    assert_no_duplicates(&mut reg_b, 8).await?;
    let ids: std::collections::HashSet<u64> = tests::proxy::all_connections(&mut reg_b)
        .await?
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids.len(), 8, "unique IDs");
    assert_failover_logged(&proxy, &a_url, &b_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_first_registry_refuses_from_the_start_reports_to_the_next()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let b = Registry::start(&dir.path().join("b")).await?;
    let dead = dead_url().await?;
    // The proxy takes the token of the first URL's server: B's.
    tests::set_token_file(&dead, tests::token_file(&b.url));
    let echo = tests::proxy::echo_server().await?;
    let proxy =
        ProxyProc::start(dir.path(), &format!("{dead},{}", b.url), "failover-2", &[]).await?;
    let mut reg_b = b.client().await?;
    for i in 0..3 {
        let c = Conn::whole(proxy.socks, echo, 2_500, i).await?;
        assert_recorded(&mut reg_b, &c, "through the second URL").await?;
    }
    let log = proxy.proc.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("failover:") && l.contains(&dead) && l.contains(&b.url)),
        "no failover line naming both URLs:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_answers_but_fails_every_call_is_passed_over_like_a_dead_one()
-> anyhow::Result<()> {
    // A accepts connections but refuses every call (it wants another token), as a replica
    // whose database is gone fails them: the proxy leases IDs from B and streams to B.
    let dir = tempfile::tempdir()?;
    let a = Registry::start(&dir.path().join("a")).await?;
    let b = Registry::start(&dir.path().join("b")).await?;
    tests::set_token_file(&a.url, tests::token_file(&b.url));
    let echo = tests::proxy::echo_server().await?;
    let registries = format!("{},{}", a.url, b.url);
    let proxy = ProxyProc::start(dir.path(), &registries, "failover-3", &[]).await?;
    let mut reg_b = b.client().await?;
    for i in 0..3 {
        let c = Conn::whole(proxy.socks, echo, 2_000, i).await?;
        assert_recorded(&mut reg_b, &c, "past the refusing first URL").await?;
    }
    let log = proxy.proc.stderr();
    assert!(
        log.lines().any(|l| l.contains("failover:")
            && l.contains("wrong token")
            && l.contains(&a.url)
            && l.contains(&b.url)),
        "no failover line naming the refusal and both URLs:\n{log}"
    );
    Ok(())
}

/// A standalone `NAME` (export-svc or intercept-svc) reading the registry at `registries`,
/// sending `token`; returns it and its URL.
async fn service(
    dir: &Path,
    name: &str,
    registries: &str,
    token: &Path,
) -> anyhow::Result<(Proc, String)> {
    let mut cmd = Command::new(bin(name));
    cmd.args(["--listen", "127.0.0.1:0", "--registry", registries])
        .env_remove("INTERPOSE_TOKEN")
        .env("INTERPOSE_TOKEN", platform::token::read_file(token)?);
    let proc = Proc::start(cmd, dir.join(format!("{name}.log"))).await?;
    let url = format!("http://{}", proc.field("listen").context("listen=")?);
    tests::set_token_file(&url, Some(token.to_path_buf()));
    Ok((proc, url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_intercept_services_read_the_next_registry_when_the_first_is_dead()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let b = Registry::start(&dir.path().join("b")).await?;
    let token = tests::token_file(&b.url).context("B's token file")?;
    let mut ingest = Ingest::open(&mut b.client().await?, "node-f").await?;
    let data = payload(3_000, 7);
    ingest
        .send_durable(vec![
            events::open(1, 40001, "svc.example", 443),
            events::packet(1, 1, Direction::C2s, &data),
            events::packet(1, 2, Direction::S2c, b"ok"),
            events::close(1, ClosedBy::Client, CloseKind::Fin, "client sent FIN"),
        ])
        .await?;
    let registries = format!("{},{}", dead_url().await?, b.url);

    let (_export, export_url) = service(dir.path(), "export-svc", &registries, &token).await?;
    let file = dir.path().join("one.pcap");
    let out = interpose(
        &export_url,
        &[
            "export",
            "--out",
            &file.display().to_string(),
            "--conn",
            "1",
        ],
    )
    .await?;
    ensure!(out.ok, "export through the second URL: {}", out.stderr);
    assert!(
        out.stderr
            .contains("exported 1 connection, 2 packets, 3002 payload bytes"),
        "{}",
        out.stderr
    );
    assert!(std::fs::metadata(&file)?.len() > 3_002);

    // intercept-svc follows the registry's records: connected once it watches B.
    let (_intercept, intercept_url) =
        service(dir.path(), "intercept-svc", &registries, &token).await?;
    let channel = tests::channel(&intercept_url, None).await?;
    let client = InterceptClient::new(channel);
    tests::eventually("intercept-svc watching the second URL", || {
        let mut client = client.clone();
        async move {
            let status = client.get_status(GetStatusRequest {}).await?.into_inner();
            Ok(status.registry_connected.then_some(()))
        }
    })
    .await?;
    // ... and what it shows of a held packet's connection is B's record, as it changes.
    client
        .clone()
        .set_config(SetConfigRequest {
            config: Some(InterceptConfig {
                enabled: true,
                ..Default::default()
            }),
        })
        .await?;
    ingest
        .send_durable(vec![events::open(2, 40002, "svc.example", 443)])
        .await?;
    let pending = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let req = HoldRequest {
                node: "node-f".into(),
                packet: Some(Packet {
                    conn_id: 2,
                    seq: 1,
                    direction: Direction::C2s as i32,
                    ts: Some(proto::time::now()),
                    data: bytes::Bytes::from_static(b"held"),
                    ..Default::default()
                }),
                dst_host: "svc.example".into(),
                dst_port: 443,
            };
            anyhow::Ok(client.hold(req).await?.into_inner())
        })
    };
    let held_conn = |want: ConnStatus| {
        let client = client.clone();
        async move {
            tests::eventually("the held packet's record", || {
                let mut client = client.clone();
                async move {
                    let held = client
                        .list_held(ListHeldRequest::default())
                        .await?
                        .into_inner()
                        .held;
                    Ok(held
                        .into_iter()
                        .find(|h| h.conn_status() == want)
                        .map(|h| (h.closed_by(), h.close_reason)))
                }
            })
            .await
        }
    };
    held_conn(ConnStatus::Active).await?;
    ingest
        .send_durable(vec![events::close(
            2,
            ClosedBy::Server,
            CloseKind::Fin,
            "server sent FIN",
        )])
        .await?;
    assert_eq!(
        held_conn(ConnStatus::Disconnected).await?,
        (ClosedBy::Server, "server sent FIN".to_string())
    );
    // Its verdict can no longer be relayed: intercept-svc says drop, naming why.
    let mut client = client.clone();
    let held = client
        .list_held(ListHeldRequest::default())
        .await?
        .into_inner()
        .held;
    let forwarded = client
        .forward(ForwardRequest {
            held_id: held[0].held_id,
            replace: false,
            data: Default::default(),
        })
        .await;
    let err = forwarded.map(|_| ()).expect_err("the connection is closed");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .starts_with("connection 2 was closed by the server (server sent FIN)"),
        "{}",
        err.message()
    );
    let v = tokio::time::timeout(tests::WAIT, pending).await???;
    assert_eq!(
        (v.action(), v.why()),
        (Action::Drop, Reason::ConnectionClosed)
    );
    Ok(())
}
