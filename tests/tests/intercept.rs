//! intercept-svc end to end: real `interpose up` and `intercept-svc` processes and the CLI as
//! a user runs it. Where `up` runs, packets come from real connections through its proxy; a
//! standalone intercept-svc with no proxy gets `Hold` calls made exactly as a proxy makes
//! them, and proxy-core's own [`Holder`] is driven directly where its own counters (calls
//! made, configs seen) are what is checked.

use std::{net::SocketAddr, path::Path};

use anyhow::Context;
use base64::Engine;
use platform::client::AuthChannel;
use proto::{
    common::{CloseKind, ClosedBy, Direction, Packet},
    intercept::{
        ForwardRequest, GetStatusRequest, HoldRequest, InterceptConfig, SetConfigRequest, Verdict,
        WatchHeldRequest,
        held_event::Kind,
        intercept_client::InterceptClient,
        verdict::{Action, Reason},
    },
};
use proxy_core::hold::{ConnMeta, FaultPolicy, Holder};
use proxy_core::relay::{Check, Fate};
use proxy_core::socks5::Addr;
use serde_json::Value;
use tests::{
    Ingest, Registry, Side, Up, WAIT, bin, events, eventually, held_list, interpose,
    interpose_columns, interpose_json, interpose_ok,
    proxy::read_n,
    tls::{disconnected, intercept_on, through, wait_record},
};
use tokio::{io::AsyncWriteExt, net::TcpStream, process::Command, task::JoinHandle};

type Client = InterceptClient<AuthChannel>;

/// The documented limit on a replacement (intercept.proto): 4 MiB.
const MAX_REPLACEMENT: usize = 4 * 1024 * 1024;

async fn client(url: &str) -> anyhow::Result<Client> {
    let ch = tests::channel(url, None).await?;
    Ok(InterceptClient::new(ch)
        .max_encoding_message_size(16 << 20)
        .max_decoding_message_size(16 << 20))
}

/// Calls `Hold` as a proxy does, in the background.
fn hold(c: &Client, conn_id: u64, seq: u64, data: &[u8]) -> JoinHandle<anyhow::Result<Verdict>> {
    let mut c = c.clone();
    let req = HoldRequest {
        node: "lab1".into(),
        packet: Some(Packet {
            conn_id,
            seq,
            direction: Direction::C2s as i32,
            ts: Some(proto::time::now()),
            data: data.to_vec().into(),
            ..Default::default()
        }),
        dst_host: "example.test".into(),
        dst_port: 80,
    };
    tokio::spawn(async move { Ok(c.hold(req).await?.into_inner()) })
}

async fn verdict(h: JoinHandle<anyhow::Result<Verdict>>) -> anyhow::Result<Verdict> {
    tokio::time::timeout(WAIT, h)
        .await
        .context("no verdict in time")??
}

fn id_of(v: &Value) -> String {
    v["held_id"].to_string()
}

/// A standalone intercept-svc on `listen` and its address.
async fn intercept_svc(
    dir: &Path,
    listen: &str,
    registry: &str,
    extra: &[&str],
) -> anyhow::Result<(Side, SocketAddr)> {
    let svc = Side::start_on("intercept-svc", dir, listen, registry, extra).await?;
    let addr = svc.proc.addr("listen")?;
    Ok((svc, addr))
}

/// `up` with intercept on for `args` (c2s to 127.0.0.1), its proxy known to hold (a probe
/// was held and forwarded), and a connection through that proxy to an echo server: the
/// stream, its record ID.
async fn holding(up: &Up, args: &[&str]) -> anyhow::Result<(TcpStream, u64)> {
    intercept_on(up, args).await?;
    let echo = tests::proxy::echo_server().await?;
    let (conn, port) = through(up, Addr::Ip(echo)).await?;
    let rec = wait_record(up, "for the connection", |c| c.src_port == u32::from(port)).await?;
    Ok((conn, rec.id))
}

/// Writes `data` on `conn`: the proxy holds it; returns its entry in `held list --json`.
async fn send_held(up: &Up, conn: &mut TcpStream, data: &[u8]) -> anyhow::Result<Value> {
    conn.write_all(data).await?;
    let list = held_list(&up.grpc, 1).await?;
    Ok(list[0].clone())
}

/// The c2s packets of connection `id` once it is closed and its history has `n` of them:
/// (bytes sent, bytes received when edited, dropped).
async fn c2s_history(up: &Up, id: u64, n: usize) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>, bool)>> {
    wait_record(up, "closed", |c| c.id == id && disconnected(c)).await?;
    let rc = tests::registry_client(&up.grpc, None).await?;
    eventually(&format!("{n} c2s packets in the history"), || {
        let mut rc = rc.clone();
        async move {
            let h = tests::proxy::history(&mut rc, id).await?;
            let c2s: Vec<_> = h
                .into_iter()
                .filter(|p| p.direction == Direction::C2s as i32)
                .map(|p| (p.data.to_vec(), p.original.to_vec(), p.dropped))
                .collect();
            Ok((c2s.len() == n).then_some(c2s))
        }
    })
    .await
}

#[tokio::test]
async fn forward_as_is_edited_any_length_and_drop() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("d"), &[]).await?;
    let s = up.grpc.as_str();
    let out = interpose_ok(s, &["intercept", "on", "--direction", "c2s"]).await?;
    assert!(out.contains("intercept on: direction c2s"), "{out}");
    let (mut conn, id) = holding(&up, &["--direction", "c2s"]).await?;
    let cases: Vec<(Vec<&str>, Vec<u8>)> = vec![
        (vec![], b"hello world".to_vec()),
        (
            vec!["--replace-text", "a much longer packet than before"],
            b"a much longer packet than before".to_vec(),
        ),
        (vec!["--replace-text", "x"], b"x".to_vec()),
        (vec!["--replace-text", ""], vec![]),
        (
            vec!["--replace-hex", "00ff0041 00"],
            vec![0, 0xff, 0, 0x41, 0],
        ),
    ];
    // What the history must say of each c2s packet: (sent, received when edited, dropped).
    let mut expected: Vec<(Vec<u8>, Vec<u8>, bool)> = Vec::new();
    for (i, (args, data)) in cases.into_iter().enumerate() {
        let held = send_held(&up, &mut conn, b"hello world").await?;
        assert_eq!(held["conn_id"], id);
        assert_eq!(held["direction"], "c2s");
        assert_eq!(held["len"], 11);
        assert_eq!(held["conn_status"], "active");
        assert_eq!(held["closed_by"], Value::Null);
        assert_eq!(
            held["data_b64"],
            base64::engine::general_purpose::STANDARD.encode("hello world")
        );
        if i == 0 {
            // The table a tester reads: the default columns, fitting 80 columns.
            let out = interpose_columns(s, &["held", "list"], 80).await?;
            let lines: Vec<&str> = out.stdout.lines().collect();
            let header: Vec<&str> = lines[0].split_whitespace().collect();
            assert_eq!(
                header,
                ["HELD", "CONN", "DIR", "TARGET", "LEN", "STATUS", "DATA"],
                "{}",
                out.stdout
            );
            assert!(
                lines[1].ends_with("11 active hello world"),
                "{}",
                out.stdout
            );
            assert!(
                lines.iter().all(|l| l.chars().count() <= 80),
                "{}",
                out.stdout
            );
        }
        let held_id = id_of(&held);
        let mut cmd = vec!["held", "forward", held_id.as_str()];
        cmd.extend(args);
        interpose_ok(s, &cmd).await?;
        // The server gets exactly the verdict's bytes (nothing, for an empty replacement:
        // the next packet's echo would show any of them).
        if !data.is_empty() {
            assert_eq!(read_n(&mut conn, data.len()).await?, data);
        }
        let original = if data == b"hello world" {
            vec![]
        } else {
            b"hello world".to_vec()
        };
        expected.push((data, original, false));
    }
    // A replacement file of binary bytes.
    let file = dir.path().join("r.bin");
    std::fs::write(&file, b"\0\x01\x02\0")?;
    let held_id = id_of(&send_held(&up, &mut conn, b"abc").await?);
    interpose_ok(
        s,
        &[
            "held",
            "forward",
            &held_id,
            "--replace-file",
            file.to_str().context("path")?,
        ],
    )
    .await?;
    assert_eq!(read_n(&mut conn, 4).await?, b"\0\x01\x02\0");
    expected.push((b"\0\x01\x02\0".to_vec(), b"abc".to_vec(), false));
    // Drop.
    let held_id = id_of(&send_held(&up, &mut conn, b"secret").await?);
    assert_eq!(
        interpose_ok(s, &["held", "drop", &held_id]).await?.trim(),
        format!("dropped held packet {held_id}")
    );
    expected.push((vec![], b"secret".to_vec(), true));
    // The ID is gone now: a clear error, non-zero exit.
    let again = interpose(s, &["held", "drop", &held_id]).await?;
    assert!(!again.ok);
    assert!(
        again
            .stderr
            .contains(&format!("no held packet with ID {held_id}")),
        "{}",
        again.stderr
    );
    assert_eq!(again.stderr.trim().lines().count(), 1, "{}", again.stderr);
    // A replacement beyond 4 MiB is refused and the packet stays held.
    let c = client(s).await?;
    let held_id = send_held(&up, &mut conn, b"big").await?["held_id"]
        .as_u64()
        .context("id")?;
    let err = c
        .clone()
        .forward(ForwardRequest {
            held_id,
            replace: true,
            data: vec![b'a'; MAX_REPLACEMENT + 1].into(),
        })
        .await
        .expect_err("oversized replacement");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("4194304"), "{}", err.message());
    assert_eq!(held_list(s, 1).await?[0]["held_id"], held_id);
    let big = vec![b'b'; MAX_REPLACEMENT];
    c.clone()
        .forward(ForwardRequest {
            held_id,
            replace: true,
            data: big.clone().into(),
        })
        .await?;
    // After the dropped "secret", the next bytes the server echoes are the 4 MiB.
    assert!(
        read_n(&mut conn, big.len()).await? == big,
        "the 4 MiB replacement"
    );
    expected.push((big, b"big".to_vec(), false));
    drop(conn);
    assert!(c2s_history(&up, id, expected.len()).await? == expected);
    Ok(())
}

#[tokio::test]
async fn turning_off_releases_every_held_packet_in_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("d"), &[]).await?;
    let s = up.grpc.as_str();
    intercept_on(&up, &["--direction", "c2s"]).await?;
    let c = client(s).await?;
    let mut watch = c
        .clone()
        .watch_held(WatchHeldRequest {})
        .await?
        .into_inner();
    // One direction of a connection waits while its packet is held: three connections.
    let echo = tests::proxy::echo_server().await?;
    let mut conns = Vec::new();
    let mut ids = Vec::new();
    for k in 1..=3 {
        let (mut conn, _) = through(&up, Addr::Ip(echo)).await?;
        conn.write_all(format!("p{k}").as_bytes()).await?;
        let list = held_list(s, k).await?;
        ids.push(list[k - 1]["held_id"].as_u64().context("held_id")?);
        conns.push(conn);
    }
    let out = interpose_ok(s, &["intercept", "off"]).await?;
    assert!(out.contains("intercept off"), "{out}");
    for (k, conn) in conns.iter_mut().enumerate() {
        assert_eq!(read_n(conn, 2).await?, format!("p{}", k + 1).as_bytes());
    }
    let mut removed = Vec::new();
    while removed.len() < 3 {
        let ev = tokio::time::timeout(WAIT, watch.message())
            .await??
            .context("watch ended")?;
        if ev.kind() == Kind::Removed {
            removed.push(ev.held_id);
        }
    }
    assert_eq!(removed, ids, "released oldest first");
    assert!(held_list(s, 0).await?.is_empty());
    let status = interpose_json(s, &["intercept", "status", "--json"]).await?;
    assert_eq!(status["enabled"], false);
    assert_eq!(status["released_by_off"], 3);
    // Off: packets pass at once (the proxy follows the setting; nothing is held again).
    for conn in &mut conns {
        assert_eq!(tests::tls::round_trip(conn, b"free").await?, b"free");
    }
    assert!(held_list(s, 0).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn beyond_max_held_packets_are_forwarded_and_counted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let (_svc, addr) =
        intercept_svc(dir.path(), "127.0.0.1:0", &reg.url, &["--max-held", "2"]).await?;
    let s = format!("http://{addr}");
    interpose_ok(&s, &["intercept", "on"]).await?;
    let c = client(&s).await?;
    let a = hold(&c, 1, 1, b"a");
    let b = hold(&c, 1, 2, b"b");
    held_list(&s, 2).await?;
    let v = verdict(hold(&c, 1, 3, b"c")).await?;
    // The reason as a value, and as the old text for clients older than `why`.
    assert_eq!(
        (v.action(), v.why(), v.reason.as_str()),
        (Action::Forward, Reason::QueueFull, "queue_full")
    );
    let status = interpose_json(&s, &["intercept", "status", "--json"]).await?;
    assert_eq!(
        (
            status["held"].as_u64(),
            status["max_held"].as_u64(),
            status["overflow_forwarded"].as_u64()
        ),
        (Some(2), Some(2), Some(1))
    );
    interpose_ok(&s, &["intercept", "off"]).await?;
    verdict(a).await?;
    verdict(b).await?;
    Ok(())
}

#[tokio::test]
async fn a_hold_timeout_forwards_unmodified() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("d"), &[]).await?;
    let s = up.grpc.as_str();
    interpose_ok(
        s,
        &["intercept", "on", "--direction", "c2s", "--timeout", "1"],
    )
    .await?;
    let echo = tests::proxy::echo_server().await?;
    let (mut conn, port) = through(&up, Addr::Ip(echo)).await?;
    // Held (as intercept-svc says), then nobody decides: the timeout forwards it as is.
    tests::tls::probe_until_held(&mut conn, b"wait", s).await?;
    assert_eq!(read_n(&mut conn, 4).await?, b"wait");
    let status = interpose_json(s, &["intercept", "status", "--json"]).await?;
    assert_eq!(status["timed_out"], 1);
    assert_eq!(status["held"], 0);
    drop(conn);
    let rec = wait_record(&up, "closed", |c| {
        c.src_port == u32::from(port) && disconnected(c)
    })
    .await?;
    let mut rc = tests::registry_client(s, None).await?;
    let h = tests::proxy::history(&mut rc, rec.id).await?;
    let last = h
        .iter()
        .rfind(|p| p.direction == Direction::C2s as i32)
        .map(|p| (p.data.to_vec(), p.original.to_vec(), p.dropped));
    // The last c2s packet is the one that waited: forwarded unmodified.
    assert_eq!(last, Some((b"wait".to_vec(), vec![], false)));
    Ok(())
}

#[tokio::test]
async fn a_packet_whose_connection_the_server_closed_cannot_be_forwarded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("d"), &[]).await?;
    let s = up.grpc.as_str();
    let mut reg = tests::registry_client(s, None).await?;
    let mut ingest = Ingest::open(&mut reg, "lab1").await?;
    ingest
        .send_durable(vec![events::open(5, 50005, "example.test", 80)])
        .await?;
    interpose_ok(s, &["intercept", "on"]).await?;
    let c = client(s).await?;
    let mut watch = c
        .clone()
        .watch_held(WatchHeldRequest {})
        .await?
        .into_inner();
    let pending = hold(&c, 5, 2, b"too late");
    let list = held_list(s, 1).await?;
    assert_eq!(list[0]["conn_status"], "active");
    let id = id_of(&list[0]);
    ingest
        .send_durable(vec![events::close(
            5,
            ClosedBy::Server,
            CloseKind::Fin,
            "server sent FIN",
        )])
        .await?;
    // The watcher sees the change ...
    loop {
        let ev = tokio::time::timeout(WAIT, watch.message())
            .await??
            .context("watch ended")?;
        if ev.kind() == Kind::Updated {
            let h = ev.held.context("held")?;
            assert_eq!(h.conn_status(), proto::common::ConnStatus::Disconnected);
            assert_eq!(h.closed_by(), ClosedBy::Server);
            break;
        }
    }
    // ... and so does the list.
    let list = held_list(s, 1).await?;
    assert_eq!(
        (
            list[0]["conn_status"].as_str(),
            list[0]["closed_by"].as_str()
        ),
        (Some("disconnected"), Some("server"))
    );
    let out = interpose(s, &["held", "forward", &id]).await?;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("connection 5 was closed by the server (server sent FIN)"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    // The entry left the queue instead of staying stuck; the proxy is told not to relay it.
    assert!(held_list(s, 0).await?.is_empty());
    let v = verdict(pending).await?;
    assert_eq!(v.action(), Action::Drop);
    assert_eq!(
        (v.why(), v.reason.as_str()),
        (Reason::ConnectionClosed, "connection_closed")
    );
    Ok(())
}

/// Runs `interpose held edit ID` with `EDITOR` set to a shell script.
async fn edit_with(server: &str, id: &str, script: &Path) -> anyhow::Result<tests::Output> {
    let mut cmd = Command::new(bin("interpose"));
    cmd.args(["held", "edit", id, "--server", server])
        .env("EDITOR", script)
        .env_remove("VISUAL")
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_TOKEN_FILE");
    if let Some(file) = tests::token_file(server) {
        cmd.env("INTERPOSE_TOKEN_FILE", file);
    }
    tests::output(cmd).await
}

fn script(dir: &Path, name: &str, body: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\nset -e\n{body}\n"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

#[tokio::test]
async fn held_edit_opens_the_editor_on_text_or_a_hex_dump() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("d"), &[]).await?;
    let s = up.grpc.as_str();
    let (mut conn, _) = holding(&up, &["--direction", "c2s"]).await?;
    // Text: the editor (like most) ends the file with a newline; the packet had none.
    let text = script(
        dir.path(),
        "text.sh",
        r#"printf 'GET /admin HTTP/1.1\n' > "$1""#,
    )?;
    let id = id_of(&send_held(&up, &mut conn, b"GET / HTTP/1.1").await?);
    let out = edit_with(s, &id, &text).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(read_n(&mut conn, 19).await?, b"GET /admin HTTP/1.1");
    // Binary: a hex dump; the script turns the second byte into 41 and appends 00 42.
    let hex = script(
        dir.path(),
        "hex.sh",
        r#"grep -q '^# held packet' "$1"
sed -i 's/^00000000: 00 ff/00000000: 00 41/' "$1"
echo '00 42' >> "$1""#,
    )?;
    let id = id_of(&send_held(&up, &mut conn, b"\0\xff\x01").await?);
    let out = edit_with(s, &id, &hex).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(read_n(&mut conn, 5).await?, b"\0\x41\x01\0\x42");
    // A failing editor leaves the packet held.
    let fail = script(dir.path(), "fail.sh", "exit 3")?;
    let id = id_of(&send_held(&up, &mut conn, b"keep").await?);
    let out = edit_with(s, &id, &fail).await?;
    assert!(!out.ok);
    assert!(out.stderr.contains("still held"), "{}", out.stderr);
    assert_eq!(id_of(&held_list(s, 1).await?[0]), id);
    interpose_ok(s, &["held", "forward", &id]).await?;
    assert_eq!(read_n(&mut conn, 4).await?, b"keep");
    Ok(())
}

const META: ConnMeta<'static> = ConnMeta {
    id: 42,
    dst_host: "api.example.test",
    dst_port: 443,
};

/// Waits until the holder has received `n` configurations.
async fn configs(h: &Holder, n: u64) -> anyhow::Result<()> {
    eventually(&format!("{n} configs"), || async {
        Ok((h.stats().configs >= n).then_some(()))
    })
    .await
}

#[tokio::test]
async fn holder_makes_no_hold_call_when_nothing_matches_and_holds_what_does() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("d"), &[]).await?;
    let s = up.grpc.as_str();
    let holder = Holder::start(s, tests::token(s).as_deref(), "lab1", FaultPolicy::Forward)?;
    configs(&holder, 1).await?;
    assert_eq!(holder.wants(&META, Direction::C2s, b"x"), Check::Pass);
    interpose_ok(
        s,
        &[
            "intercept",
            "on",
            "--host",
            "*.nowhere.test",
            "--contains",
            "never",
        ],
    )
    .await?;
    configs(&holder, 2).await?;
    for i in 0..1000u32 {
        let data = format!("packet {i}");
        assert_eq!(
            holder.wants(&META, Direction::C2s, data.as_bytes()),
            Check::Pass
        );
    }
    assert_eq!(holder.stats().hold_calls, 0);
    // A matching packet is held through the real service, and the user's edit comes back.
    interpose_ok(
        s,
        &[
            "intercept",
            "on",
            "--host",
            "*.example.test",
            "--port",
            "443",
            "--direction",
            "c2s",
        ],
    )
    .await?;
    configs(&holder, 3).await?;
    assert_eq!(holder.wants(&META, Direction::S2c, b"x"), Check::Pass);
    assert_eq!(
        holder.wants(&META, Direction::C2s, b"x"),
        Check::Hold { rewritten: None }
    );
    let h = &holder;
    // When the relay read the packet (long before this hold).
    let read_at = prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 123,
    };
    let decision = tokio::time::timeout(
        WAIT,
        h.hold(
            &META,
            1,
            Direction::C2s,
            read_at,
            bytes::Bytes::from_static(b"x"),
        ),
    );
    let user = async {
        let id = id_of(&held_list(s, 1).await?[0]);
        let held = client(s)
            .await?
            .get_held(proto::intercept::GetHeldRequest {
                held_id: id.parse()?,
            })
            .await?
            .into_inner();
        interpose_ok(s, &["held", "forward", &id, "--replace-hex", "7900"]).await?;
        anyhow::Ok(held.packet.and_then(|p| p.ts))
    };
    let (decision, held_ts) = tokio::join!(decision, user);
    let held_ts = held_ts?;
    assert_eq!(
        decision.context("no decision")?,
        Fate::Replace(bytes::Bytes::from_static(b"y\0"))
    );
    // The service holds the packet with the time the proxy read it.
    assert_eq!(held_ts, Some(read_at));
    assert_eq!(holder.stats().hold_calls, 1);
    // Replace rules apply in the proxy, without a call.
    interpose_ok(s, &["intercept", "off"]).await?;
    let out = interpose_ok(
        s,
        &[
            "intercept",
            "rule",
            "add",
            "--direction",
            "c2s",
            "--match",
            "token=abc",
            "--replace-hex",
            "746f6b656e3d00",
        ],
    )
    .await?;
    assert_eq!(out.trim(), "added rule 1");
    configs(&holder, 5).await?;
    assert_eq!(
        holder.wants(&META, Direction::C2s, b"a token=abc!"),
        Check::Rewritten(bytes::Bytes::from_static(b"a token=\0!"))
    );
    assert_eq!(
        holder.wants(&META, Direction::S2c, b"a token=abc!"),
        Check::Pass
    );
    let rules = interpose_json(s, &["intercept", "rule", "list", "--json"]).await?;
    assert_eq!(rules[0]["direction"], "c2s");
    assert_eq!(
        rules[0]["match_b64"],
        base64::engine::general_purpose::STANDARD.encode("token=abc")
    );
    interpose_ok(s, &["intercept", "rule", "remove", "1"]).await?;
    let gone = interpose(s, &["intercept", "rule", "remove", "1"]).await?;
    assert!(
        !gone.ok && gone.stderr.contains("no replace rule with ID 1"),
        "{}",
        gone.stderr
    );
    assert_eq!(holder.stats().hold_calls, 1);
    Ok(())
}

#[tokio::test]
async fn holder_follows_the_policy_when_intercept_svc_is_killed_and_holds_again_after_restart()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let (svc, addr) = intercept_svc(dir.path(), "127.0.0.1:0", &reg.url, &[]).await?;
    let url = format!("http://{addr}");
    let holder = Holder::start(
        &url,
        tests::token(&url).as_deref(),
        "lab1",
        FaultPolicy::Forward,
    )?;
    let on = SetConfigRequest {
        config: Some(InterceptConfig {
            enabled: true,
            ..Default::default()
        }),
    };
    client(&url).await?.set_config(on.clone()).await?;
    eventually("the holder holds", || async {
        Ok((holder.wants(&META, Direction::C2s, b"x") != Check::Pass).then_some(()))
    })
    .await
    .with_context(|| format!("{:?}", holder.stats()))?;
    let h = &holder;
    let pending = tokio::time::timeout(
        WAIT,
        h.hold(
            &META,
            1,
            Direction::C2s,
            proto::time::now(),
            bytes::Bytes::from_static(b"held"),
        ),
    );
    let kill = async {
        held_list(&url, 1).await?;
        svc.proc.kill().await;
        anyhow::Ok(())
    };
    // The hold ends with the policy's decision once the service is gone (not with its own
    // timeout, which is far away: the setting has none).
    let (decision, killed) = tokio::join!(pending, kill);
    killed?;
    // Not held: forwarded as held (the policy), and counted as such.
    assert_eq!(decision.context("no decision")?, Fate::Forward);
    assert_eq!((holder.stats().not_held, holder.stats().decided), (1, 0));
    // Unreachable: nothing is held, and a hold that races the config follows the policy in
    // the connect timeout.
    eventually("holding stops", || async {
        Ok((holder.wants(&META, Direction::C2s, b"x") == Check::Pass).then_some(()))
    })
    .await?;
    assert_eq!(
        tokio::time::timeout(
            WAIT,
            holder.hold(
                &META,
                2,
                Direction::C2s,
                proto::time::now(),
                bytes::Bytes::from_static(b"z")
            )
        )
        .await
        .context("no decision")?,
        Fate::Forward
    );
    assert_eq!((holder.stats().not_held, holder.stats().decided), (2, 0));
    // A restarted service (intercept off until told otherwise) is picked up again.
    let (_svc2, _) = intercept_svc(dir.path(), &addr.to_string(), &reg.url, &[]).await?;
    let before = holder.stats().configs;
    client(&url).await?.set_config(on).await?;
    eventually("holding again", || async {
        Ok((holder.stats().configs > before
            && holder.wants(&META, Direction::C2s, b"x") != Check::Pass)
            .then_some(()))
    })
    .await?;
    let calls = holder.stats().hold_calls;
    let pending = tokio::time::timeout(
        WAIT,
        h.hold(
            &META,
            3,
            Direction::C2s,
            proto::time::now(),
            bytes::Bytes::from_static(b"again"),
        ),
    );
    let user = async {
        let id = id_of(&held_list(&url, 1).await?[0]);
        interpose_ok(&url, &["held", "forward", &id]).await
    };
    let (decision, user) = tokio::join!(pending, user);
    user?;
    assert_eq!(decision.context("no decision")?, Fate::Forward);
    assert_eq!((holder.stats().not_held, holder.stats().decided), (2, 1));
    assert_eq!(holder.stats().hold_calls, calls + 1);
    let status = client(&url)
        .await?
        .get_status(GetStatusRequest {})
        .await?
        .into_inner();
    assert!(status.registry_connected);
    Ok(())
}

/// Writes `probe` until the proxy holds one (it follows the settings over a stream), which is
/// then the one held packet; returns its held ID.
async fn hold_a_probe(s: &mut tokio::net::TcpStream, url: &str) -> anyhow::Result<String> {
    let held = tests::tls::probe_until_held(s, b"probe", url).await?;
    Ok(held.held_id.to_string())
}

#[tokio::test]
async fn a_real_proxy_forwards_its_held_packet_when_intercept_svc_dies_and_holds_after_restart()
-> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let (svc, addr) = intercept_svc(dir.path(), "127.0.0.1:0", &reg.url, &[]).await?;
    let url = format!("http://{addr}");
    let proxy = tests::proxy::ProxyProc::start(
        dir.path(),
        &reg.url,
        "lab1",
        &["--intercept", &url, "--intercept-fault", "forward"],
    )
    .await?;
    let server = tests::tls::serve(|mut s| async move { tests::tls::echo(&mut s).await }).await?;
    interpose_ok(&url, &["intercept", "on", "--direction", "c2s"]).await?;
    let mut s = tests::proxy::socks_connected(proxy.socks, server).await?;
    hold_a_probe(&mut s, &url).await?;

    // SIGKILL with the packet held: the fault policy (forward) releases it (the setting
    // has no hold timeout, so nothing else could).
    svc.proc.kill().await;
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut back)).await??;
    assert_eq!(&back, b"probe");
    // Recorded, not only logged: the node's losses in the registry count it.
    eventually("the packet not held in conns stats", || async {
        let v = interpose_json(&reg.url, &["conns", "stats", "--json"]).await?;
        Ok((v["losses"]["lab1"]["intercept_not_held"] == 1).then_some(()))
    })
    .await?;

    // A restarted service on the same address holds again, the proxy untouched.
    let (_svc2, _) = intercept_svc(dir.path(), &addr.to_string(), &reg.url, &[]).await?;
    interpose_ok(&url, &["intercept", "on", "--direction", "c2s"]).await?;
    let id = hold_a_probe(&mut s, &url).await?;
    interpose_ok(&url, &["held", "forward", &id, "--replace-text", "again"]).await?;
    tokio::time::timeout(WAIT, s.read_exact(&mut back)).await??;
    assert_eq!(&back, b"again");
    Ok(())
}
