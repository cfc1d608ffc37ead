//! End-to-end tests of `interpose replay` (issue 23): `interpose up` as a real process, a
//! line-based protocol server and a TLS server on loopback, and psql talking to a throwaway
//! PostgreSQL with TLS through the proxy; each recorded connection is replayed with the
//! CLI and the new records, histories and comparisons are checked.

use std::net::SocketAddr;

use anyhow::{Context, bail, ensure};
use base64::Engine;
use proto::common::{Connection, Direction};
use proxy_core::socks5::Addr;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tests::{
    Up, WAIT, held_list, interpose, interpose_json, interpose_ok,
    proxy::{direction_bytes, history, socks_connected, wait_history},
    registry_client,
    tls::{
        Pki, disconnected, intercept_on, proxy_ca, serve, socks, through, tls_connect, wait_record,
    },
};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpListener,
};

/// A line protocol: every line gets `OK <line>`, `QUIT` gets `BYE` and the server closes.
async fn serve_lines<S: AsyncRead + AsyncWrite + Unpin>(s: S) -> anyhow::Result<()> {
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let line = line.trim_end();
        let s = r.get_mut();
        if line == "QUIT" {
            s.write_all(b"BYE\n").await?;
            s.shutdown().await?;
            return Ok(());
        }
        s.write_all(format!("OK {line}\n").as_bytes()).await?;
        s.flush().await?;
    }
}

/// The client of the line protocol: each line, then its answer; `QUIT` last.
async fn talk_lines<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    lines: &[&str],
) -> anyhow::Result<String> {
    let mut r = BufReader::new(s);
    let mut got = String::new();
    for l in lines.iter().chain(&["QUIT"]) {
        r.get_mut().write_all(format!("{l}\n").as_bytes()).await?;
        r.get_mut().flush().await?;
        let mut answer = String::new();
        tokio::time::timeout(WAIT, r.read_line(&mut answer))
            .await
            .context("answer timed out")??;
        got.push_str(&answer);
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, r.read_to_end(&mut rest)).await;
    Ok(got)
}

/// `interpose replay ARGS --json`, parsed: the events, in order.
async fn replay_json(up: &Up, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut all = vec!["replay"];
    all.extend(args);
    all.push("--json");
    let out = interpose(&up.grpc, &all).await?;
    if !out.ok {
        bail!("interpose {all:?} failed: {}", out.stderr);
    }
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {l:?}")))
        .collect()
}

fn events<'a>(evs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    evs.iter().filter(|e| e["event"] == kind).collect()
}

/// The server bytes of a replay's `data` events.
fn server_bytes(evs: &[Value]) -> Vec<u8> {
    events(evs, "data")
        .iter()
        .flat_map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d["data_b64"].as_str().unwrap_or_default())
                .unwrap_or_default()
        })
        .collect()
}

/// The one run's end.
fn finished(evs: &[Value]) -> anyhow::Result<&Value> {
    let f = events(evs, "finished");
    ensure!(f.len() == 1, "one finished event: {evs:?}");
    Ok(f[0])
}

/// The record of `id`, once it is disconnected.
async fn closed_record(up: &Up, id: u64) -> anyhow::Result<Connection> {
    wait_record(up, &format!("{id} disconnected"), |c| {
        c.id == id && disconnected(c)
    })
    .await
}

/// A line-protocol connection through `up` to `server`; returns its record once closed.
async fn record_lines(up: &Up, server: SocketAddr, lines: &[&str]) -> anyhow::Result<Connection> {
    let (s, port) = through(up, Addr::Ip(server)).await?;
    let got = talk_lines(s, lines).await?;
    let want: String = lines
        .iter()
        .map(|l| format!("OK {l}\n"))
        .collect::<String>()
        + "BYE\n";
    ensure!(got == want, "the original's answers: {got:?}");
    let rec = wait_record(up, "the original", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    Ok(rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_protocol_is_replayed_with_edits_and_each_pacing() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &[]).await?;
    let server = serve(serve_lines).await?;
    let original = record_lines(&up, server, &["HELLO alice", "COUNT 3"]).await?;
    let id = original.id.to_string();
    let mut registry = registry_client(&up.grpc, None).await?;
    let original_history = history(&mut registry, original.id).await?;
    let c2s_seqs: Vec<u64> = original_history
        .iter()
        .filter(|p| p.direction == Direction::C2s as i32)
        .map(|p| p.seq)
        .collect();
    ensure!(
        c2s_seqs.len() == 3,
        "three client packets: {original_history:?}"
    );

    // As it was, with each pacing: the same answers, identical, a new linked record.
    for pace in ["wait", "recorded", "burst"] {
        let evs = replay_json(&up, &[&id, "--pace", pace, "--settle", "100ms"]).await?;
        let started = events(&evs, "started");
        ensure!(started.len() == 1, "{pace}: {evs:?}");
        let new_id = started[0]["conn_id"].as_u64().context("conn_id")?;
        ensure!(new_id != original.id && new_id != 0, "{pace}: {new_id}");
        ensure!(started[0]["target"] == server.to_string());
        let f = finished(&evs)?;
        ensure!(f["error"].is_null(), "{pace}: {f}");
        ensure!(f["comparison"]["identical"] == true, "{pace}: {f}");
        ensure!(f["packets_sent"] == 3, "{pace}: {f}");
        ensure!(
            server_bytes(&evs) == b"OK HELLO alice\nOK COUNT 3\nBYE\n",
            "{pace}: {:?}",
            String::from_utf8_lossy(&server_bytes(&evs))
        );
        let rec = closed_record(&up, new_id).await?;
        ensure!(rec.replay_of == original.id, "{pace}: {rec:?}");
        let h = history(&mut registry, new_id).await?;
        ensure!(
            direction_bytes(&h, Direction::C2s)
                == direction_bytes(&original_history, Direction::C2s),
            "{pace}: the replay sent other bytes"
        );
        let summary = events(&evs, "summary");
        ensure!(
            summary.len() == 1 && summary[0]["identical"] == 1,
            "{evs:?}"
        );
    }

    // `conns list` shows the link, in the table and in JSON.
    let table = interpose_ok(&up.grpc, &["conns", "list"]).await?;
    ensure!(table.contains(&format!("replay of {id}")), "{table}");
    let list = interpose_json(&up.grpc, &["conns", "list", "--json"]).await?;
    let replays = list
        .as_array()
        .context("array")?
        .iter()
        .filter(|c| c["replay_of"] == original.id)
        .count();
    ensure!(replays == 3, "{list}");
    ensure!(
        list.as_array()
            .context("array")?
            .iter()
            .any(|c| c["id"] == original.id && c.get("replay_of").is_none()),
        "the original has no replay_of"
    );

    // Edits: replace-text changes what the server answers; the comparison names the first
    // differing server packet (the answer to HELLO) and the offset of the name in it.
    let evs = replay_json(&up, &[&id, "--replace-text", "alice=bob"]).await?;
    ensure!(server_bytes(&evs) == b"OK HELLO bob\nOK COUNT 3\nBYE\n");
    let cmp = &finished(&evs)?["comparison"];
    ensure!(cmp["identical"] == false, "{cmp}");
    ensure!(cmp["packet"] == 1 && cmp["offset"] == 9, "{cmp}");
    let s2c_first = original_history
        .iter()
        .find(|p| p.direction == Direction::S2c as i32)
        .context("an answer")?;
    ensure!(cmp["seq"] == s2c_first.seq, "{cmp}");

    // --replace-hex, --packet SEQ=FILE and --only together.
    let file = data.path().join("packet.txt");
    std::fs::write(&file, "COUNT 7\n")?;
    let packet_arg = format!("{}={}", c2s_seqs[1], file.display());
    let only = format!("{},{}", c2s_seqs[1], c2s_seqs[2]);
    let evs = replay_json(
        &up,
        &[
            &id,
            "--packet",
            &packet_arg,
            "--only",
            &only,
            "--replace-hex",
            "37=38",
            "--pace",
            "burst",
        ],
    )
    .await?;
    ensure!(
        server_bytes(&evs) == b"OK COUNT 8\nBYE\n",
        "{:?}",
        String::from_utf8_lossy(&server_bytes(&evs))
    );
    ensure!(finished(&evs)?["packets_sent"] == 2);

    // --to: the same packets to another server of the same protocol.
    let other = serve(serve_lines).await?;
    let evs = replay_json(&up, &[&id, "--to", &other.to_string()]).await?;
    ensure!(events(&evs, "started")[0]["target"] == other.to_string());
    ensure!(finished(&evs)?["comparison"]["identical"] == true);

    // --edit: the editor (a sed script here) changes one packet and deletes another.
    let editor = data.path().join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i -e 's/COUNT 3/COUNT 4/' -e '/^=== packet 1 (text) ===$/,+1d' \"$1\"\n",
    )?;
    std::fs::set_permissions(
        &editor,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
    )?;
    let mut cmd = tokio::process::Command::new(tests::bin("interpose"));
    cmd.args(["replay", &id, "--edit", "--json", "--server", &up.grpc])
        .env("EDITOR", &editor)
        .env_remove("VISUAL")
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_SERVER");
    if let Some(f) = tests::token_file(&up.grpc) {
        cmd.env("INTERPOSE_TOKEN_FILE", f);
    }
    let out = tests::output(cmd).await?;
    ensure!(out.ok, "replay --edit: {}", out.stderr);
    let evs: Vec<Value> = out
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        server_bytes(&evs) == b"OK COUNT 4\nBYE\n",
        "{:?}",
        String::from_utf8_lossy(&server_bytes(&evs))
    );

    // Load: three runs, two at once, each its own linked record.
    let evs = replay_json(&up, &[&id, "--times", "3", "--concurrency", "2"]).await?;
    let ends = events(&evs, "finished");
    ensure!(ends.len() == 3, "{evs:?}");
    ensure!(
        ends.iter().all(|f| f["comparison"]["identical"] == true),
        "{evs:?}"
    );
    ensure!(
        events(&evs, "data").is_empty(),
        "many runs print their ends only"
    );
    let summary = events(&evs, "summary");
    ensure!(
        summary[0]["runs"] == 3 && summary[0]["identical"] == 3,
        "{evs:?}"
    );

    // Plain text output: the answers, then the comparison line.
    let text = interpose_ok(&up.grpc, &["replay", &id]).await?;
    ensure!(text.contains("OK HELLO alice\nOK COUNT 3\nBYE\n"), "{text}");
    ensure!(text.contains("server side identical (30 bytes)"), "{text}");

    // Bad input: named, non-zero, and the server keeps serving.
    for (args, says) in [
        (vec!["replay", "999999"], "no connection 999999"),
        (
            vec!["replay", &id, "--only", "999"],
            "no client-to-server packet 999",
        ),
        (vec!["replay", &id, "--to", "nowhere"], "HOST:PORT"),
        (vec!["replay", &id, "--replace-text", "x"], "A=B"),
    ] {
        let out = interpose(&up.grpc, &args).await?;
        ensure!(!out.ok, "{args:?} succeeded");
        ensure!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    // A connection whose history was purged has nothing to send: said so.
    let purged = record_lines(&up, server, &["GONE"]).await?;
    interpose_ok(
        &up.grpc,
        &["history", "purge", "--conn", &purged.id.to_string()],
    )
    .await?;
    let out = interpose(&up.grpc, &["replay", &purged.id.to_string()]).await?;
    ensure!(
        !out.ok
            && out
                .stderr
                .contains("no client-to-server packets in the history"),
        "{}",
        out.stderr
    );
    // A server that is gone: the run fails, named, with the new record saying why.
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?
    };
    let out = interpose(&up.grpc, &["replay", &id, "--to", &gone.to_string()]).await?;
    ensure!(!out.ok, "{}", out.stdout);
    ensure!(out.stderr.contains("1 of 1 runs failed"), "{}", out.stderr);
    ensure!(out.stderr.contains("ConnectionRefused"), "{}", out.stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_go_through_the_hold_point() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &[]).await?;
    let server = serve(serve_lines).await?;
    let original = record_lines(&up, server, &["HOLD ME"]).await?;
    intercept_on(&up, &["--direction", "c2s", "--host", "127.0.0.1"]).await?;
    let id = original.id.to_string();
    let grpc = up.grpc.clone();
    let replay = tokio::spawn(async move {
        interpose(&grpc, &["replay", &id, "--json", "--settle", "50ms"]).await
    });
    // The replay's first packet is held like any connection's; forwarded with new bytes.
    let held = held_list(&up.grpc, 1).await?;
    let conn_id = held[0]["conn_id"].as_u64().context("conn_id")?;
    ensure!(conn_id != original.id);
    let rec = wait_record(&up, "the replay", |c| c.id == conn_id).await?;
    ensure!(rec.replay_of == original.id, "{rec:?}");
    let held_id = held[0]["held_id"].to_string();
    interpose_ok(
        &up.grpc,
        &["held", "forward", &held_id, "--replace-text", "HOLD YOU\n"],
    )
    .await?;
    // The QUIT packet is held too.
    let held = held_list(&up.grpc, 1).await?;
    interpose_ok(
        &up.grpc,
        &["held", "forward", &held[0]["held_id"].to_string()],
    )
    .await?;
    let out = tokio::time::timeout(WAIT, replay).await???;
    ensure!(out.ok, "{}", out.stderr);
    ensure!(
        out.stdout.contains("differs at server packet 1"),
        "{}",
        out.stdout
    );
    let mut registry = registry_client(&up.grpc, None).await?;
    // The history has the edit: sent as forwarded, with what the replay sent as original.
    let h = wait_history(
        &mut registry,
        conn_id,
        b"HOLD YOU\nQUIT\n",
        b"OK HOLD YOU\nBYE\n",
    )
    .await?;
    ensure!(
        h.iter()
            .any(|p| p.modified && &p.original[..] == b"HOLD ME\n"),
        "{h:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_is_replayed_with_its_sni_and_alpn() -> anyhow::Result<()> {
    let pki = Pki::new("replay test CA")?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let acceptor = pki.acceptor(&[b"lines/1"])?;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let server = serve(move |s| {
        let acceptor = acceptor.clone();
        let seen_tx = seen_tx.clone();
        async move {
            let tls = acceptor.accept(s).await?;
            let (_, conn) = tls.get_ref();
            let _ = seen_tx.send((
                conn.server_name().map(str::to_string),
                conn.alpn_protocol().map(<[u8]>::to_vec),
            ));
            serve_lines(tls).await
        }
    })
    .await?;
    // The original: SNI localhost, ALPN lines/1, through the proxy's TLS splice.
    let (tcp, port) = through(&up, Addr::Domain("localhost".into(), server.port())).await?;
    let mut roots = tests::tls::roots(&proxy_ca(&up)?)?;
    roots.add(pki_root(&pki)?)?;
    let mut cfg = (*tests::tls::client_config(roots)).clone();
    cfg.alpn_protocols = vec![b"lines/1".to_vec(), b"other".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let got = talk_lines(tls, &["SECRET 1", "SECRET 2"]).await?;
    ensure!(got == "OK SECRET 1\nOK SECRET 2\nBYE\n", "{got:?}");
    let original = wait_record(&up, "the TLS original", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    ensure!(
        original.client_tls.is_some() && original.sni == "localhost" && original.alpn == "lines/1"
    );
    ensure!(original.tls_after_seq == 0, "{original:?}");
    let seen_original = seen.recv().await.context("server saw the original")?;
    let id = original.id.to_string();
    for pace in ["wait", "recorded", "burst"] {
        let evs = replay_json(&up, &[&id, "--pace", pace]).await?;
        ensure!(events(&evs, "started")[0]["tls"] == true, "{evs:?}");
        let f = finished(&evs)?;
        ensure!(
            f["error"].is_null() && f["comparison"]["identical"] == true,
            "{pace}: {f}"
        );
        ensure!(server_bytes(&evs) == b"OK SECRET 1\nOK SECRET 2\nBYE\n");
        let seen_replay = tokio::time::timeout(WAIT, seen.recv())
            .await?
            .context("server saw the replay")?;
        ensure!(
            seen_replay == seen_original,
            "{pace}: {seen_replay:?} vs {seen_original:?}"
        );
        let new_id = events(&evs, "started")[0]["conn_id"]
            .as_u64()
            .context("id")?;
        let rec = closed_record(&up, new_id).await?;
        ensure!(rec.replay_of == original.id && rec.sni == "localhost" && rec.alpn == "lines/1");
        ensure!(
            rec.client_tls.is_some() && rec.upstream_tls.is_some(),
            "{rec:?}"
        );
    }
    // Edited over TLS: the decrypted bytes are edited, the server answers the new ones.
    let evs = replay_json(
        &up,
        &[&id, "--replace-text", "SECRET=PUBLIC", "--pace", "burst"],
    )
    .await?;
    ensure!(server_bytes(&evs) == b"OK PUBLIC 1\nOK PUBLIC 2\nBYE\n");
    let cmp = &finished(&evs)?["comparison"];
    ensure!(cmp["packet"] == 1 && cmp["offset"] == 3, "{cmp}");
    Ok(())
}

fn pki_root(pki: &Pki) -> anyhow::Result<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    Ok(rustls::pki_types::CertificateDer::from_pem_file(
        pki.ca_file(),
    )?)
}

/// STARTTLS: a plaintext greeting and command, then TLS on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_tls_is_redone_at_the_same_point() -> anyhow::Result<()> {
    let pki = Pki::new("replay starttls CA")?;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let acceptor = pki.acceptor(&[])?;
    let server = serve(move |mut s| {
        let acceptor = acceptor.clone();
        async move {
            s.write_all(b"220 ready\n").await?;
            let mut cmd = [0u8; 9];
            s.read_exact(&mut cmd).await?;
            ensure!(&cmd == b"STARTTLS\n", "{cmd:?}");
            s.write_all(b"220 go ahead\n").await?;
            let tls = acceptor.accept(s).await?;
            serve_lines(tls).await
        }
    })
    .await?;
    let (mut tcp, port) = through(&up, Addr::Ip(server)).await?;
    let mut greeting = [0u8; 10];
    tcp.read_exact(&mut greeting).await?;
    tcp.write_all(b"STARTTLS\n").await?;
    let mut go = [0u8; 13];
    tcp.read_exact(&mut go).await?;
    let tls = tls_connect(&proxy_ca(&up)?, ServerName::try_from("127.0.0.1")?, tcp).await??;
    let got = talk_lines(tls, &["MAIL 1"]).await?;
    ensure!(got == "OK MAIL 1\nBYE\n", "{got:?}");
    let original = wait_record(&up, "the STARTTLS original", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    // greeting (1), STARTTLS (2), go ahead (3), then TLS.
    ensure!(
        original.tls_after_seq == 3 && original.client_tls.is_some(),
        "{original:?}"
    );
    let id = original.id.to_string();
    for pace in ["wait", "burst"] {
        let evs = replay_json(&up, &[&id, "--pace", pace]).await?;
        let f = finished(&evs)?;
        ensure!(
            f["error"].is_null() && f["comparison"]["identical"] == true,
            "{pace}: {f}"
        );
        ensure!(
            server_bytes(&evs) == b"220 ready\n220 go ahead\nOK MAIL 1\nBYE\n",
            "{pace}: {:?}",
            String::from_utf8_lossy(&server_bytes(&evs))
        );
        let new_id = events(&evs, "started")[0]["conn_id"]
            .as_u64()
            .context("id")?;
        let rec = closed_record(&up, new_id).await?;
        ensure!(
            rec.replay_of == original.id && rec.client_tls.is_some(),
            "{pace}: {rec:?}"
        );
        if pace == "wait" {
            // Paced as the original was: the same packets before the handshake (a burst may
            // see the server's two lines in one read).
            ensure!(rec.tls_after_seq == 3, "{rec:?}");
        }
    }
    Ok(())
}

/// Forwards every connection to a local port through the proxy's SOCKS port to `target`
/// (psql speaks no SOCKS); returns the local port.
async fn socks_forwarder(socks: SocketAddr, target: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = socks_connected(socks, target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    Ok(addr)
}

/// The PostgreSQL message (type byte) that holds `offset` of a server's stream, whose first
/// `skip` bytes are the plaintext answer to SSLRequest.
fn pg_message_at(stream: &[u8], skip: usize, offset: usize) -> Option<u8> {
    let mut at = skip;
    while at + 5 <= stream.len() {
        let len = u32::from_be_bytes(stream[at + 1..at + 5].try_into().ok()?) as usize;
        let end = at + 1 + len;
        if offset >= at && offset < end {
            return Some(stream[at]);
        }
        at = end;
    }
    None
}

/// The Done-when: psql over TLS through the proxy, then its connection replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psql_session_over_tls_is_replayed_and_differs_at_backend_key_data() -> anyhow::Result<()>
{
    if tests::tools::required("psql").is_none() {
        return Ok(());
    }
    let pki = Pki::new("replay database CA")?;
    let (cert, key) = pki.server_pem();
    let (cert, key) = (cert.to_string(), key.to_string());
    let cluster = tokio::task::spawn_blocking(move || {
        let cluster = pg_fixture::Cluster::start()?;
        cluster.enable_tls(&cert, &key)?;
        // Cleartext password over TCP (inside TLS): a replayed SCRAM exchange would fail,
        // its server nonce being new each time.
        let hba = cluster.dir().join("data").join("pg_hba.conf");
        let before = std::fs::read_to_string(&hba)?;
        std::fs::write(
            &hba,
            format!("hostssl all all 127.0.0.1/32 password\n{before}"),
        )?;
        cluster.restart()?;
        anyhow::Ok(cluster)
    })
    .await??;
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    let pg: SocketAddr = format!("127.0.0.1:{}", cluster.port()).parse()?;
    let forward = socks_forwarder(socks(&up)?, pg).await?;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} dbname=postgres sslmode=require gssencmode=disable",
        forward.port(),
        pg_fixture::USER
    );
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("psql")
            .args([&conninfo, "-Atc", "select 40 + 2 as answer"])
            .env("PGPASSWORD", cluster.password())
            .env("PGCONNECT_TIMEOUT", "10")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("psql timed out")??;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "42",
        "psql: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let original = wait_record(&up, "psql's connection", |c| {
        c.dst_port == u32::from(pg.port()) && disconnected(c)
    })
    .await?;
    // SSLRequest (1) and its `S` (2) were plain; the rest was TLS, decrypted.
    ensure!(
        original.tls_after_seq == 2 && original.client_tls.is_some(),
        "{original:?}"
    );
    let mut registry = registry_client(&up.grpc, None).await?;
    let original_s2c = direction_bytes(&history(&mut registry, original.id).await?, Direction::S2c);

    let evs = replay_json(&up, &[&original.id.to_string()]).await?;
    ensure!(events(&evs, "started")[0]["tls"] == true, "{evs:?}");
    let f = finished(&evs)?;
    ensure!(f["error"].is_null(), "{f}");
    // The server ran the query again and answered it: a DataRow with "42".
    let answer = server_bytes(&evs);
    let data_row = [b"D\x00\x00\x00\x0c\x00\x01\x00\x00\x00\x0242".as_slice()].concat();
    ensure!(
        answer.windows(data_row.len()).any(|w| w == data_row),
        "no DataRow 42 in {:?}",
        String::from_utf8_lossy(&answer)
    );
    // Not identical: the first difference is in BackendKeyData (the new session's
    // process ID and secret key).
    let cmp = &f["comparison"];
    ensure!(cmp["identical"] == false, "{cmp}");
    let at = cmp["stream_offset"].as_u64().context("stream_offset")? as usize;
    let kind = pg_message_at(&original_s2c, 1, at);
    ensure!(
        kind == Some(b'K'),
        "the first difference ({cmp}) is in message {kind:?}"
    );
    let new_id = events(&evs, "started")[0]["conn_id"]
        .as_u64()
        .context("id")?;
    let rec = closed_record(&up, new_id).await?;
    ensure!(
        rec.replay_of == original.id && rec.tls_after_seq == 2,
        "{rec:?}"
    );
    drop(cluster);
    Ok(())
}

/// A lab: a registry and two standalone proxies; a replay is made by the proxy `--proxy`
/// names, which refuses another node's connection unless asked for any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_lab_the_original_node_replays_and_others_only_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = tests::Registry::start(&dir.path().join("registry")).await?;
    let mut grpc = Vec::new();
    let mut proxies = Vec::new();
    for node in ["alpha", "beta"] {
        let data = dir.path().join(node);
        let p = tests::proxy::ProxyProc::start(
            dir.path(),
            &registry.url,
            node,
            &[
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                &data.display().to_string(),
            ],
        )
        .await?;
        grpc.push(format!("http://{}", p.proc.addr("grpc")?));
        proxies.push(p);
    }
    let server = serve(serve_lines).await?;
    let s = socks_connected(proxies[0].socks, server).await?;
    s.set_nodelay(true)?;
    let port = s.local_addr()?.port();
    ensure!(talk_lines(s, &["LAB"]).await? == "OK LAB\nBYE\n");
    let client = registry.client().await?;
    let original = tests::eventually("the lab original", || {
        let mut client = client.clone();
        async move {
            let all = tests::proxy::all_connections(&mut client).await?;
            Ok(all
                .into_iter()
                .find(|c| c.src_port == u32::from(port) && disconnected(c)))
        }
    })
    .await?;
    let id = original.id.to_string();
    let token = tests::token(&registry.url).context("the registry's token")?;
    let replay = |proxy: String, extra: &'static [&'static str]| {
        let (url, id, token) = (registry.url.clone(), id.clone(), token.clone());
        async move {
            let mut args = vec!["replay".to_string(), id, "--proxy".into(), proxy];
            args.extend(["--token".into(), token, "--json".into()]);
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            interpose(&url, &args).await
        }
    };
    let refused = replay(grpc[1].clone(), &[]).await?;
    ensure!(!refused.ok, "{}", refused.stdout);
    ensure!(
        refused.stderr.contains("carried by node \"alpha\"") && refused.stderr.contains("\"beta\""),
        "{}",
        refused.stderr
    );
    for (proxy, extra, node) in [
        (grpc[0].clone(), &[][..], "alpha"),
        (grpc[1].clone(), &["--any-node"][..], "beta"),
    ] {
        let out = replay(proxy, extra).await?;
        ensure!(out.ok, "{}", out.stderr);
        let evs: Vec<Value> = out
            .stdout
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        ensure!(
            finished(&evs)?["comparison"]["identical"] == true,
            "{evs:?}"
        );
        let new_id = events(&evs, "started")[0]["conn_id"]
            .as_u64()
            .context("id")?;
        let rec = tests::eventually("the lab replay's record", || {
            let mut client = client.clone();
            async move {
                let all = tests::proxy::all_connections(&mut client).await?;
                Ok(all.into_iter().find(|c| c.id == new_id && disconnected(c)))
            }
        })
        .await?;
        ensure!(rec.node == node && rec.replay_of == original.id, "{rec:?}");
    }
    Ok(())
}
