//! A lab end to end: two registry-svc replicas on one PostgreSQL database, two proxy-cores
//! reporting to different replicas, and `interpose conns watch` on a third. One replica is
//! killed with SIGKILL under traffic: its proxy fails over to the other and replays what
//! was not acknowledged, and the records and history end complete, each connection once.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use platform::client::AuthChannel;
use proto::{
    common::{ConnStatus, Connection, Direction},
    registry::registry_client::RegistryClient,
};
use serde_json::Value;
use tests::{
    Registry, WAIT,
    proxy::{ProxyProc, all_connections, direction_bytes, history, socks_connected},
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "lab-token";
/// Connections each proxy carries.
const PER_PROXY: usize = 60;
/// Connections carried past a hung replica (it hangs halfway).
const HUNG_CONNS: usize = 6;
/// Replica a hangs once its proxy has carried this many, and dies ten later.
const KILL_AFTER: usize = 20;

/// A proxy-core reporting to `replicas` in that order, as `node`.
async fn proxy(
    dir: &std::path::Path,
    replicas: [&Registry; 2],
    node: &str,
) -> anyhow::Result<ProxyProc> {
    let urls = format!("{},{}", replicas[0].url, replicas[1].url);
    ProxyProc::start(dir, &urls, node, &["--token", TOKEN]).await
}

/// Waits until `client`'s registry holds `n` records or more, all closed; returns them.
async fn all_closed(
    client: &RegistryClient<AuthChannel>,
    n: usize,
    place: &str,
) -> anyhow::Result<Vec<Connection>> {
    tests::eventually(&format!("every connection closed, {place}"), || {
        let mut client = client.clone();
        async move {
            // A call that meets a pooled database connection the restart ended answers
            // UNAVAILABLE once; the next one takes a fresh connection.
            let all = match all_connections(&mut client).await {
                Ok(all) => all,
                Err(e) if unavailable(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let closed = all
                .iter()
                .filter(|r| r.status == ConnStatus::Disconnected as i32)
                .count();
            Ok((all.len() >= n && closed == all.len()).then_some(all))
        }
    })
    .await
}

/// Whether `e` is a gRPC UNAVAILABLE (a transient failure the caller may retry).
fn unavailable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| s.code() == tonic::Code::Unavailable)
}

/// Checks that each connection `i` that `proxy` (node `node`) carried from client port
/// `ports[i]` has exactly one record among `records`, with its byte counts, and a history
/// holding every byte once in both directions, no packet twice.
async fn recorded_once(
    client: &mut RegistryClient<AuthChannel>,
    records: &[Connection],
    node: &str,
    proxy: usize,
    ports: &[u16],
) -> anyhow::Result<()> {
    for (i, port) in ports.iter().enumerate() {
        let mine: Vec<_> = records
            .iter()
            .filter(|r| r.node == node && r.src_port == u32::from(*port))
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "{node} connection {i} (port {port}) recorded once"
        );
        let r = mine[0];
        let data = payload(proxy, i);
        assert_eq!(r.bytes_c2s, data.len() as u64, "{node} connection {i}");
        assert_eq!(r.bytes_s2c, data.len() as u64, "{node} connection {i}");
        let packets = history(client, r.id).await?;
        let mut seqs: Vec<u64> = packets.iter().map(|p| p.seq).collect();
        seqs.dedup();
        assert_eq!(
            seqs.len(),
            packets.len(),
            "{node} connection {i}: a packet twice"
        );
        assert_eq!(
            direction_bytes(&packets, Direction::C2s),
            data,
            "{node} {i} c2s"
        );
        assert_eq!(
            direction_bytes(&packets, Direction::S2c),
            data,
            "{node} {i} s2c"
        );
    }
    Ok(())
}

/// The bytes connection `i` of `proxy` sends (and gets back).
fn payload(proxy: usize, i: usize) -> Vec<u8> {
    let mut p = format!("proxy {proxy} connection {i}: ").into_bytes();
    p.extend((0..3000).map(|k| b'a' + ((k + i) % 26) as u8));
    p
}

/// One connection through `socks`: sends `data` (in two writes, with `between` awaited in
/// between), checks the echo; the client source port.
async fn echo_once(
    socks: SocketAddr,
    echo: SocketAddr,
    data: &[u8],
    between: impl std::future::Future<Output = ()>,
) -> anyhow::Result<u16> {
    let mut s = socks_connected(socks, echo).await?;
    let port = s.local_addr()?.port();
    let (first, second) = data.split_at(data.len() / 2);
    s.write_all(first).await?;
    between.await;
    s.write_all(second).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut back)).await??;
    anyhow::ensure!(back == data, "echo differs");
    Ok(port)
}

/// Carries `PER_PROXY` connections through `socks` one after another. Before connection
/// `i` it waits until `stage` has reached `waits[i]` (if any), and says in `done` how many
/// it finished. Connection 0 spans the whole run: it sends half its bytes first and the
/// rest after all the others. The client source port of each.
async fn traffic(
    socks: SocketAddr,
    echo: SocketAddr,
    proxy: usize,
    done: Arc<AtomicUsize>,
    mut stage: tokio::sync::watch::Receiver<usize>,
    waits: HashMap<usize, usize>,
) -> anyhow::Result<Vec<u16>> {
    let (rest_tx, rest_rx) = tokio::sync::oneshot::channel::<()>();
    let long = tokio::spawn(async move {
        echo_once(socks, echo, &payload(proxy, 0), async {
            let _ = rest_rx.await;
        })
        .await
    });
    let mut ports = vec![0];
    for i in 1..PER_PROXY {
        if let Some(&want) = waits.get(&i) {
            tokio::time::timeout(WAIT, stage.wait_for(|s| *s >= want)).await??;
        }
        ports.push(echo_once(socks, echo, &payload(proxy, i), async {}).await?);
        done.store(i, Ordering::Relaxed);
    }
    let _ = rest_tx.send(());
    ports[0] = long.await??;
    Ok(ports)
}

#[tokio::test]
async fn a_replica_killed_under_traffic_loses_nothing_and_records_nothing_twice()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = pg_fixture::Cluster::shared().create_database()?;
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(Registry::start_replica(&dir.path().join(name), &url, TOKEN).await?);
    }
    let [a, b, c] =
        <[Registry; 3]>::try_from(replicas).map_err(|_| anyhow::anyhow!("three replicas"))?;

    // The CLI watches the third replica from the start.
    let mut watch = tokio::process::Command::new(tests::bin("interpose"))
        .args(["conns", "watch", "--json", "--server", &c.url])
        .env("INTERPOSE_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = watch
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("watch stdout"))?;
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&line)
                && lines_tx.send(v).is_err()
            {
                return;
            }
        }
    });

    // Proxy 1 reports to replica a (then b), proxy 2 to b (then a).
    let p1 = proxy(dir.path(), [&a, &b], "p1").await?;
    let p2 = proxy(dir.path(), [&b, &a], "p2").await?;
    // Proxy 1 carries a third of its connections, then replica a hangs (SIGSTOP: what
    // proxy 1 sends it now is never acknowledged) while proxy 1 carries another few, then
    // a dies (SIGKILL) and proxy 1 carries the rest.
    let echo = tests::proxy::echo_server().await?;
    let done1 = Arc::new(AtomicUsize::new(0));
    let (stage, stages) = tokio::sync::watch::channel(0usize);
    let waits = HashMap::from([(KILL_AFTER, 1), (KILL_AFTER + 10, 2)]);
    let t1 = tokio::spawn(traffic(p1.socks, echo, 1, done1.clone(), stages, waits));
    let (_keep, idle) = tokio::sync::watch::channel(0usize);
    let t2 = tokio::spawn(traffic(
        p2.socks,
        echo,
        2,
        Arc::new(AtomicUsize::new(0)),
        idle,
        HashMap::new(),
    ));
    let carried = |n: usize| {
        let done1 = done1.clone();
        move || {
            let done = done1.load(Ordering::Relaxed);
            async move { Ok((done + 1 >= n).then_some(())) }
        }
    };
    tests::eventually(
        "proxy 1 to carry its first connections",
        carried(KILL_AFTER),
    )
    .await?;
    a.proc.send_signal("STOP")?;
    stage.send_replace(1);
    tests::eventually(
        "proxy 1 to carry connections while a hangs",
        carried(KILL_AFTER + 10),
    )
    .await?;
    a.proc.signal("KILL").await?;
    stage.send_replace(2);
    let ports = [t1.await??, t2.await??];

    // Every connection once, closed, with its bytes; history whole, nothing twice.
    let mut client = tests::registry_client(&c.url, Some(TOKEN)).await?;
    let expected = 2 * PER_PROXY;
    let records = all_closed(&client, expected, "on the third replica").await?;
    assert_eq!(records.len(), expected, "one record per connection");
    let ids: HashSet<u64> = records.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), expected, "unique IDs");
    for (proxy, node) in [(1, "p1"), (2, "p2")] {
        recorded_once(&mut client, &records, node, proxy, &ports[proxy - 1]).await?;
    }
    let log = p1.proc.stderr();
    assert!(
        log.contains(&format!("switching to {}", b.url)),
        "proxy 1 says it moved to replica b:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("replaying") && !l.contains("replaying 0 ")),
        "proxy 1 replayed what a never acknowledged:\n{log}"
    );

    // The watcher on the third replica saw each connection under one ID, ending closed.
    let mut last: HashMap<u64, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while last.len() < expected || last.values().any(|s| s != "disconnected") {
        let ev = tokio::time::timeout_at(deadline, lines_rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
        if let Some(conn) = ev.get("connection") {
            let id = conn["id"].as_u64().unwrap_or_default();
            last.insert(id, conn["status"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(last.keys().copied().collect::<HashSet<_>>(), ids);
    drop(b);
    Ok(())
}

/// A replica that hangs (SIGSTOP: its connections stay open, nothing is acknowledged, no
/// reset comes) is left for the next one after the reporter's acknowledgement timeout, and
/// what it never acknowledged is recorded there once.
#[tokio::test]
async fn a_hung_replica_is_left_after_the_acknowledgement_timeout() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = pg_fixture::Cluster::shared().create_database()?;
    let a = Registry::start_replica(&dir.path().join("a"), &url, TOKEN).await?;
    let b = Registry::start_replica(&dir.path().join("b"), &url, TOKEN).await?;
    let p = proxy(dir.path(), [&a, &b], "p").await?;
    let echo = tests::proxy::echo_server().await?;
    let mut ports = Vec::new();
    for i in 0..HUNG_CONNS {
        if i == HUNG_CONNS / 2 {
            a.proc.send_signal("STOP")?;
        }
        ports.push(echo_once(p.socks, echo, &payload(1, i), async {}).await?);
    }
    let mut client = tests::registry_client(&b.url, Some(TOKEN)).await?;
    let records = all_closed(&client, HUNG_CONNS, "read through b").await?;
    recorded_once(&mut client, &records, "p", 1, &ports).await?;
    let log = p.proc.stderr();
    assert!(log.contains("no acknowledgement for 5 s"), "{log}");
    // Let the hung replica go, so that it can be stopped.
    a.proc.send_signal("CONT")?;
    Ok(())
}

/// The database restarts under traffic (its sessions ended): the registry's failed commit
/// is not acknowledged, the proxy replays it, the registry reconnects, and every connection
/// is recorded once with its history.
#[tokio::test]
async fn a_database_restart_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Arc::new(tokio::task::spawn_blocking(pg_fixture::Cluster::start).await??);
    let url = cluster.create_database()?;
    let reg = Registry::start_replica(&dir.path().join("r"), &url, TOKEN).await?;
    let p = ProxyProc::start(dir.path(), &reg.url, "p", &["--token", TOKEN]).await?;
    let echo = tests::proxy::echo_server().await?;
    let mut ports = Vec::new();
    for i in 0..6 {
        if i == 3 {
            let cluster = cluster.clone();
            tokio::task::spawn_blocking(move || cluster.restart()).await??;
        }
        ports.push(echo_once(p.socks, echo, &payload(1, i), async {}).await?);
    }
    let mut client = tests::registry_client(&reg.url, Some(TOKEN)).await?;
    let records = all_closed(&client, 6, "after the database restarted").await?;
    assert_eq!(records.len(), 6);
    recorded_once(&mut client, &records, "p", 1, &ports).await?;
    drop(p);
    drop(reg);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
