//! Intercept at the relay's hold point, end to end, for the pitfalls other tools hit:
//! `interpose up` as a real process, real servers on loopback, clients going through its
//! SOCKS port, and the CLI giving the verdicts as a user does.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use base64::Engine;
use proto::common::{ClosedBy, Direction, Packet};
use proxy_core::socks5::Addr;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tests::{
    Up, WAIT, eventually, held_list, interpose, interpose_json, interpose_ok,
    proxy::{Server, history, read_to_end},
    registry_client,
    tls::{
        Pki, disconnected, echo, intercept_on, probe_until_held, proxy_ca, serve, through,
        tls_connect, wait_record,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

/// The bytes of a held packet as `held list --json` shows them.
fn held_data(held: &Value) -> anyhow::Result<Vec<u8>> {
    let b64 = held["data_b64"].as_str().context("data_b64")?;
    Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
}

/// The one held packet, once it is another than `previous`.
async fn next_held(up: &Up, previous: Option<&str>) -> anyhow::Result<Value> {
    eventually("the next held packet", || async {
        let v = interpose_json(&up.grpc, &["held", "list", "--json"]).await?;
        let list = v.as_array().cloned().unwrap_or_default();
        if list.len() > 1 {
            bail!("the proxy held more than one packet of one direction: {list:?}");
        }
        Ok(list
            .into_iter()
            .find(|h| Some(h["held_id"].to_string().as_str()) != previous))
    })
    .await
}

/// The c2s history packets of the connection from client port `port`, once it closed.
async fn c2s_history(up: &Up, port: u16) -> anyhow::Result<Vec<Packet>> {
    let rec = wait_record(up, "for the held connection, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    let mut client = registry_client(&up.grpc, None).await?;
    Ok(history(&mut client, rec.id)
        .await?
        .into_iter()
        .filter(|p| p.direction == Direction::C2s as i32)
        .collect())
}

/// mitmproxy's `tcp_message` kill forwarded the message anyway when more data raced in
/// (PR #8200). Here the client keeps writing numbered chunks while a packet is held, and the
/// rounds alternate drop, forward, drop, edit: the server receives exactly what the
/// verdicts say, in order, and never a byte of a dropped packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_packet_is_never_forwarded_while_more_data_races_in() -> anyhow::Result<()> {
    const ROUNDS: usize = 12;
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path(), &[]).await?;
    intercept_on(&up, &["--direction", "c2s"]).await?;
    let server = Server::bind().await?;
    let (mut client, port) = through(&up, Addr::Ip(server.addr)).await?;
    let mut srv = server.accept().await?;
    let received = tokio::spawn(async move { read_to_end(&mut srv).await });
    let stop = Arc::new(AtomicBool::new(false));
    let writing = stop.clone();
    let writer = tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut i = 0u32;
        while !writing.load(Ordering::Relaxed) && i < 60_000 {
            let chunk = format!("<{i}>");
            client.write_all(chunk.as_bytes()).await?;
            sent.extend_from_slice(chunk.as_bytes());
            i += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        client.shutdown().await?;
        anyhow::Ok((sent, client))
    });
    // (held bytes, what the verdict says the server gets)
    let mut verdicts: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut previous = None;
    for round in 0..ROUNDS {
        let held = next_held(&up, previous.as_deref()).await?;
        assert_eq!(held["direction"], "c2s");
        let data = held_data(&held)?;
        let id = held["held_id"].to_string();
        let sends = match round % 4 {
            0 | 2 => {
                interpose_ok(&up.grpc, &["held", "drop", &id]).await?;
                Vec::new()
            }
            1 => {
                interpose_ok(&up.grpc, &["held", "forward", &id]).await?;
                data.clone()
            }
            _ => {
                let edit = format!("[edit {round}]");
                interpose_ok(&up.grpc, &["held", "forward", &id, "--replace-text", &edit]).await?;
                edit.into_bytes()
            }
        };
        verdicts.push((data, sends));
        previous = Some(id);
    }
    stop.store(true, Ordering::Relaxed);
    // Off releases what is held now and holds nothing more: the rest passes as it is.
    interpose_ok(&up.grpc, &["intercept", "off"]).await?;
    let (sent, client) = tokio::time::timeout(WAIT, writer).await???;
    let received = tokio::time::timeout(WAIT, received).await???;
    drop(client);

    let held: Vec<u8> = verdicts.iter().flat_map(|(d, _)| d.clone()).collect();
    assert!(
        sent.starts_with(&held),
        "the held packets are not the client's bytes in order"
    );
    let mut expected: Vec<u8> = verdicts.iter().flat_map(|(_, s)| s.clone()).collect();
    expected.extend_from_slice(&sent[held.len()..]);
    assert_eq!(
        String::from_utf8_lossy(&received),
        String::from_utf8_lossy(&expected)
    );
    // The history marks each dropped packet, with what was received and nothing sent.
    let c2s = c2s_history(&up, port).await?;
    let dropped: Vec<&[u8]> = c2s
        .iter()
        .filter(|p| p.dropped)
        .map(|p| &p.original[..])
        .collect();
    let want: Vec<&[u8]> = verdicts
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 == 0 || i % 4 == 2)
        .map(|(_, (d, _))| d.as_slice())
        .collect();
    assert_eq!(dropped, want);
    assert!(c2s.iter().filter(|p| p.dropped).all(|p| p.data.is_empty()));
    let recorded: Vec<u8> = c2s.iter().flat_map(|p| p.data.clone()).collect();
    assert!(
        recorded.ends_with(&received),
        "the history's sent bytes differ from what the server received"
    );
    Ok(())
}

/// An SMTP-like server: greets, answers `STARTTLS` with `220 ready`, then speaks TLS and
/// reports every plaintext byte it received after the upgrade (until the client closes).
async fn starttls_recorder(
    pki: &Pki,
) -> anyhow::Result<(std::net::SocketAddr, mpsc::Receiver<Vec<u8>>)> {
    let acceptor = pki.acceptor(&[])?;
    let (tx, rx) = mpsc::channel(4);
    let addr = serve(move |mut s| {
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        async move {
            s.write_all(b"220 smtp.test ESMTP\r\n").await?;
            let mut cmd = [0u8; 10];
            s.read_exact(&mut cmd).await?;
            if &cmd != b"STARTTLS\r\n" {
                bail!("unexpected command {cmd:?}");
            }
            s.write_all(b"220 ready\r\n").await?;
            let mut tls = acceptor.accept(s).await?;
            let mut got = Vec::new();
            match tls.read_to_end(&mut got).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(e.into()),
            }
            tx.send(got).await?;
            Ok(())
        }
    })
    .await?;
    Ok((addr, rx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starttls_upgrade_while_a_plaintext_packet_is_held_then_holds_inside_tls()
-> anyhow::Result<()> {
    let pki = Pki::new("Upstream Test CA")?;
    let (server, mut received) = starttls_recorder(&pki).await?;
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path(), &["--upstream-ca", &pki.ca_arg()]).await?;
    intercept_on(&up, &["--direction", "c2s"]).await?;
    let (mut tcp, port) = through(&up, Addr::Domain("localhost".into(), server.port())).await?;
    let mut greeting = [0u8; 21];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut greeting))
        .await
        .context("the greeting was stalled")??;
    assert_eq!(&greeting, b"220 smtp.test ESMTP\r\n");
    // The plaintext command is held; nothing reaches the server until it is forwarded.
    tcp.write_all(b"STARTTLS\r\n").await?;
    let held = next_held(&up, None).await?;
    assert_eq!(held_data(&held)?, b"STARTTLS\r\n");
    let mut reply = [0u8; 11];
    let early = tokio::time::timeout(Duration::from_millis(200), tcp.read_exact(&mut reply)).await;
    assert!(early.is_err(), "the server answered a held command");
    let id = held["held_id"].to_string();
    interpose_ok(&up.grpc, &["held", "forward", &id]).await?;
    tokio::time::timeout(WAIT, tcp.read_exact(&mut reply)).await??;
    assert_eq!(&reply, b"220 ready\r\n");
    // The ClientHello is detected and terminated (a handshake is never held) ...
    let mut tls = tls_connect(&proxy_ca(&up)?, ServerName::try_from("localhost")?, tcp).await??;
    // ... and the decrypted data inside is held and edited.
    tls.write_all(b"MAIL FROM:<alice@example.com>\r\n").await?;
    tls.flush().await?;
    let held = next_held(&up, Some(&id)).await?;
    assert_eq!(held_data(&held)?, b"MAIL FROM:<alice@example.com>\r\n");
    let edit = "MAIL FROM:<mallory@example.com>\r\nRCPT TO:<bob@example.com>\r\n";
    interpose_ok(
        &up.grpc,
        &[
            "held",
            "forward",
            &held["held_id"].to_string(),
            "--replace-text",
            edit,
        ],
    )
    .await?;
    tls.shutdown().await?;
    let got = tokio::time::timeout(WAIT, received.recv())
        .await
        .context("the server did not finish")?
        .context("the server failed")?;
    assert_eq!(String::from_utf8_lossy(&got), edit);
    drop(tls);
    // The record is TLS; the history has the plaintext command and the edit's both sides.
    let c2s = c2s_history(&up, port).await?;
    assert_eq!(c2s[0].data, &b"STARTTLS\r\n"[..]);
    assert!(!c2s[0].modified);
    let edited = c2s
        .iter()
        .find(|p| p.modified)
        .context("an edited packet")?;
    assert_eq!(edited.original, &b"MAIL FROM:<alice@example.com>\r\n"[..]);
    assert_eq!(edited.data, edit.as_bytes());
    let rec = wait_record(&up, "TLS", |c| c.src_port == u32::from(port)).await?;
    assert!(rec.tls && rec.client_tls.is_some(), "{rec:?}");
    Ok(())
}
/// A real server closes the connection while a client packet is held: the held packet
/// shows the connection disconnected, closed by the server, and forwarding it fails with a
/// message saying so; the entry leaves the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_packet_whose_server_closed_shows_it_and_cannot_be_forwarded() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path(), &[]).await?;
    intercept_on(&up, &["--direction", "c2s"]).await?;
    let server = Server::bind().await?;
    let (mut client, port) = through(&up, Addr::Ip(server.addr)).await?;
    let mut srv = server.accept().await?;
    client.write_all(b"QUIT\r\n").await?;
    let held = next_held(&up, None).await?;
    assert_eq!(held["conn_status"], "active");
    let id = held["held_id"].to_string();
    // The server says goodbye and closes; the client reads it and closes too.
    srv.write_all(b"421 closing\r\n").await?;
    drop(srv);
    assert_eq!(read_to_end(&mut client).await?, b"421 closing\r\n");
    drop(client);
    let held = eventually("the held packet's connection closed", || async {
        let v = interpose_json(&up.grpc, &["held", "list", "--json"]).await?;
        Ok(v.as_array()
            .and_then(|l| l.first().cloned())
            .filter(|h| h["conn_status"] == "disconnected"))
    })
    .await?;
    assert_eq!(held["held_id"].to_string(), id);
    assert_eq!(held["closed_by"], "server");
    let out = interpose(&up.grpc, &["held", "forward", &id]).await?;
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains("was closed by the server"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(held_list(&up.grpc, 0).await?.is_empty());
    let rec = wait_record(&up, "closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    assert_eq!(rec.closed_by, ClosedBy::Server as i32, "{rec:?}");
    Ok(())
}

/// Holding works the other way too: with `--direction s2c` the server's packets wait, are
/// edited or dropped, and the client receives exactly what the verdicts say; the history
/// keeps both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_to_client_packets_are_held_edited_and_dropped() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &[]).await?;
    let server = serve(|mut s| async move { echo(&mut s).await }).await?;
    interpose_ok(&up.grpc, &["intercept", "on", "--direction", "s2c"]).await?;
    let (mut s, port) = through(&up, Addr::Ip(server)).await?;
    probe_until_held(&mut s, b"probe", &up.grpc).await?;
    let first = next_held(&up, None).await?;
    assert_eq!(first["direction"], "s2c");
    assert_eq!(held_data(&first)?, b"probe");
    let id = first["held_id"].to_string();
    interpose_ok(
        &up.grpc,
        &["held", "forward", &id, "--replace-text", "PROBE, EDITED"],
    )
    .await?;
    let mut back = vec![0u8; "PROBE, EDITED".len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back)).await??;
    assert_eq!(back, b"PROBE, EDITED");

    s.write_all(b"gone").await?;
    let held = next_held(&up, Some(&id)).await?;
    assert_eq!(held_data(&held)?, b"gone");
    let id = held["held_id"].to_string();
    interpose_ok(&up.grpc, &["held", "drop", &id]).await?;
    s.write_all(b"after").await?;
    let held = next_held(&up, Some(&id)).await?;
    interpose_ok(&up.grpc, &["held", "forward", &held["held_id"].to_string()]).await?;
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut back)).await??;
    assert_eq!(&back, b"after", "the dropped packet reached the client");
    interpose_ok(&up.grpc, &["intercept", "off"]).await?;
    s.shutdown().await?;
    let rest = read_to_end(&mut s).await?;
    assert!(rest.is_empty(), "{rest:?}");

    let rec = wait_record(&up, "for the held connection, closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    let mut client = registry_client(&up.grpc, None).await?;
    let s2c: Vec<Packet> = history(&mut client, rec.id)
        .await?
        .into_iter()
        .filter(|p| p.direction == Direction::S2c as i32)
        .collect();
    let edited = s2c
        .iter()
        .find(|p| p.modified && !p.dropped)
        .context("edited")?;
    assert_eq!(
        (&edited.original[..], &edited.data[..]),
        (&b"probe"[..], &b"PROBE, EDITED"[..])
    );
    let dropped = s2c.iter().find(|p| p.dropped).context("dropped")?;
    assert_eq!(
        (&dropped.original[..], &dropped.data[..]),
        (&b"gone"[..], &b""[..])
    );
    Ok(())
}
