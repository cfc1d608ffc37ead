//! What a new user trips over in the first hour with the CLI (issue 25), against a real
//! `interpose up`: every printing subcommand piped into a reader that stops at once,
//! `--data-dir` alone reaching the server `up` recorded there, `ca export --out -`,
//! `conns watch` at 80 columns, narrow `conns list`, `history show` and the history
//! filters, what `conns clear` says exports lose, watches stopping on SIGINT when started in
//! the background, and a clean shutdown without warnings.

use std::{path::Path, process::Stdio};

use anyhow::Context;
use proto::{
    common::{ClientProcess, CloseKind, ClosedBy, Direction, Packet},
    intercept::{
        HoldRequest, InterceptConfig, SetConfigRequest, intercept_client::InterceptClient,
    },
    registry::{ConnectionUpdate, Event, event::Kind},
};
use serde_json::Value;
use tests::{Ingest, Up, WAIT, bin, events, interpose, interpose_columns, interpose_json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

/// The update event that tells the registry which process opened connection `id`.
fn process_update(id: u64, pid: u32, name: &str) -> Event {
    Event {
        kind: Some(Kind::Updated(ConnectionUpdate {
            id,
            client_process: Some(ClientProcess {
                pid,
                name: name.into(),
            }),
            ..Default::default()
        })),
    }
}

/// Records and history to look at: a closed web connection with an edited packet, an active
/// database one.
async fn seed(url: &str) -> anyhow::Result<Ingest> {
    let mut client = tests::registry_client(url, None).await?;
    let mut ingest = Ingest::open(&mut client, "lab1").await?;
    ingest
        .send_durable(vec![
            events::open(1, 50001, "web.test", 80),
            events::packet(1, 1, Direction::C2s, b"GET / HTTP/1.1\r\n\r\n"),
            events::edited_packet(1, 2, Direction::C2s, b"secret=1", b"secret=2", false),
            events::packet(1, 3, Direction::S2c, b"HTTP/1.1 200 OK\r\n\r\nhi"),
            events::close(1, ClosedBy::Client, CloseKind::Fin, "client sent FIN"),
            events::open(2, 50002, "db.test", 5432),
            events::packet(2, 1, Direction::C2s, b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            events::packet(2, 2, Direction::S2c, b"N"),
        ])
        .await?;
    Ok(ingest)
}

/// `interpose ARGS` for the server the harness started at `url`, given through the
/// environment (so the subcommands that talk to no server take it too).
fn command(url: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(bin("interpose"));
    cmd.args(args);
    for_server(&mut cmd, url);
    cmd
}

/// Points `cmd` at the server the harness started at `url` through the environment.
fn for_server(cmd: &mut Command, url: &str) {
    cmd.env("INTERPOSE_SERVER", url)
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_DATA_DIR")
        .env_remove("COLUMNS")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tests::token_file(url) {
        Some(f) => cmd.env("INTERPOSE_TOKEN_FILE", f),
        None => cmd.env_remove("INTERPOSE_TOKEN_FILE"),
    };
}

/// Runs `args` with stdout a pipe whose reader is gone before the first byte is written (as
/// `| head -0`), and checks it ends normally: exit 0, no panic.
async fn with_closed_stdout(url: &str, args: &[String]) -> anyhow::Result<()> {
    let mut child = command(url, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .with_context(|| format!("{args:?} still running {WAIT:?} after its reader left"))??;
    let err = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.code() != Some(101) && !err.contains("panicked"),
        "{args:?} panicked: {err}"
    );
    anyhow::ensure!(out.status.success(), "{args:?} failed: {err}");
    Ok(())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[tokio::test]
async fn every_printing_subcommand_ends_quietly_when_its_reader_leaves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let up = Up::start(&data, &[]).await?;
    let _ingest = seed(&up.grpc).await?;
    // Two held packets, for `held list/watch/show/forward/drop`.
    let ch = tests::channel(&up.grpc, None).await?;
    let mut intercept = InterceptClient::new(ch);
    intercept
        .set_config(SetConfigRequest {
            config: Some(InterceptConfig {
                enabled: true,
                ..Default::default()
            }),
        })
        .await?;
    let mut holds = Vec::new();
    for seq in [10, 11] {
        let mut c = intercept.clone();
        holds.push(tokio::spawn(async move {
            c.hold(HoldRequest {
                node: "lab1".into(),
                packet: Some(Packet {
                    conn_id: 2,
                    seq,
                    direction: Direction::C2s as i32,
                    ts: Some(proto::time::now()),
                    data: b"held".to_vec().into(),
                    ..Default::default()
                }),
                dst_host: "db.test".into(),
                dst_port: 5432,
            })
            .await
        }));
    }
    let held = tests::held_list(&up.grpc, 2).await?;
    let held_ids: Vec<String> = held.iter().map(|h| h["held_id"].to_string()).collect();
    let cert = dir.path().join("ca.pem");
    let cert = cert.to_string_lossy();
    let clients = dir.path().join("clients");
    let clients = clients.to_string_lossy();
    let data_dir = data.to_string_lossy();

    let mut every: Vec<Vec<String>> = [
        &["conns", "list"][..],
        &["conns", "list", "--json"],
        &["conns", "watch"],
        &["conns", "watch", "--json"],
        &["conns", "copy", "1", "2"],
        &["conns", "stats"],
        &["conns", "stats", "--json"],
        &["history"],
        &["history", "--json"],
        &["history", "--tail", "1"],
        &["history", "show", "1", "2"],
        &["export", "--out", "-"],
        &["export", "--out", "-", "--pcapng"],
        &["export", "--follow", "--out", "-"],
        &["intercept", "status"],
        &["intercept", "status", "--json"],
        &["intercept", "rule", "add", "--match", "a", "--replace", "b"],
        &["intercept", "rule", "list"],
        &["intercept", "rule", "list", "--json"],
        &["held", "list"],
        &["held", "list", "--json"],
        &["held", "watch"],
        &["held", "watch", "--json"],
        &["held", "show", &held_ids[0]],
        &["ca", "export", "--out", "-"],
        &["ca", "export", "--out", &cert],
        &[
            "ca",
            "issue-client",
            "--name",
            "t",
            "--out",
            &clients,
            "--data-dir",
            &data_dir,
        ],
        &["completions", "bash"],
        &["man"],
        &["history", "purge", "--conn", "1"],
        &["held", "forward", &held_ids[0]],
        &["held", "drop", &held_ids[1]],
        &["intercept", "on", "--port", "80"],
        &["intercept", "off"],
        &["conns", "clear", "1"],
        &["ca", "regenerate"],
    ]
    .iter()
    .map(|a| strings(a))
    .collect();
    // The rule added above, removed last.
    every.push(strings(&["intercept", "rule", "remove", "RULE"]));
    for args in &every {
        let args = if args.last().is_some_and(|a| a == "RULE") {
            let rules = interpose_json(&up.grpc, &["intercept", "rule", "list", "--json"]).await?;
            let id = rules[0]["id"].to_string();
            strings(&["intercept", "rule", "remove", &id])
        } else {
            args.clone()
        };
        with_closed_stdout(&up.grpc, &args).await?;
    }
    for h in holds {
        tokio::time::timeout(WAIT, h).await???;
    }
    Ok(())
}

#[tokio::test]
async fn data_dir_alone_reaches_the_server_up_recorded_there() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let up = Up::start(&data, &[]).await?;
    let _ingest = seed(&up.grpc).await?;
    let run = |how: &'static str| {
        let mut cmd = Command::new(bin("interpose"));
        cmd.args(["conns", "list", "--json"])
            .env_remove("INTERPOSE_SERVER")
            .env_remove("INTERPOSE_TOKEN")
            .env_remove("INTERPOSE_TOKEN_FILE")
            .env_remove("INTERPOSE_DATA_DIR");
        match how {
            "flag" => {
                cmd.arg("--data-dir").arg(&data);
            }
            "env" => {
                cmd.env("INTERPOSE_DATA_DIR", &data);
            }
            _ => {
                cmd.arg("--data-dir").arg(dir.path());
            }
        }
        tests::output(cmd)
    };
    for how in ["flag", "env"] {
        let out = run(how).await?;
        assert!(out.ok, "{how}: {}", out.stderr);
        let v: Value = serde_json::from_str(&out.stdout)?;
        let ids: Vec<u64> = v
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["id"].as_u64()).collect())
            .unwrap_or_default();
        assert_eq!(ids, [1, 2], "{how}: {}", out.stdout);
    }
    // A directory no `up` ran in says so, naming the file it looked for.
    let out = run("none").await?;
    assert!(!out.ok);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("no server recorded in") && out.stderr.contains("--data-dir"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test]
async fn ca_export_to_dash_writes_stdout_not_a_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let cwd = dir.path().join("cwd");
    std::fs::create_dir(&cwd)?;
    for (der, starts) in [
        (false, &b"-----BEGIN CERTIFICATE-----"[..]),
        (true, &[0x30u8][..]),
    ] {
        let mut args = strings(&["ca", "export", "--out", "-"]);
        if der {
            args.push("--der".into());
        }
        let mut cmd = command(&up.grpc, &args);
        cmd.current_dir(&cwd);
        let out = tokio::time::timeout(WAIT, cmd.output()).await??;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            out.stdout.starts_with(starts),
            "der {der}: {:?}",
            out.stdout
        );
        assert!(
            err.contains("wrote CA certificate") && err.contains("to stdout"),
            "{err}"
        );
        assert!(!cwd.join("-").exists(), "a file named - was written");
    }
    let pem = interpose(&up.grpc, &["ca", "export", "--out", "-"]).await?;
    let ca = std::fs::read_to_string(up.proc.field("ca").context("ca= in ready line")?)?;
    assert_eq!(pem.stdout, ca);
    Ok(())
}

/// Reads `lines` until one contains `what` (bounded by [`WAIT`]).
async fn line_with(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: &str,
    seen: &mut Vec<String>,
) -> anyhow::Result<String> {
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .with_context(|| format!("no line with {what:?} in time; saw {seen:#?}"))??
            .with_context(|| format!("the watch ended before {what:?}; saw {seen:#?}"))?;
        seen.push(line.clone());
        if line.contains(what) {
            return Ok(line);
        }
    }
}

#[tokio::test]
async fn conns_watch_fits_80_columns_with_a_header_and_shows_what_changed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let mut child = command(&up.grpc, &strings(&["conns", "watch"]))
        .env("COLUMNS", "80")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut seen = Vec::new();
    let header = line_with(&mut lines, "TIME", &mut seen).await?;
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        columns,
        ["TIME", "EVENT", "ID", "TARGET", "DETAIL"],
        "{header}"
    );
    line_with(&mut lines, "watching for changes", &mut seen).await?;

    let long_host = "a-rather-long-host-name-for-a-watch.service.internal.example.test";
    let mut client = tests::registry_client(&up.grpc, None).await?;
    let mut ingest = Ingest::open(&mut client, "lab1").await?;
    ingest
        .send_durable(vec![events::open(7, 50007, long_host, 8443)])
        .await?;
    let opened = line_with(&mut lines, "OPENED", &mut seen).await?;
    ingest
        .send_durable(vec![process_update(7, 4242, "curl")])
        .await?;
    let updated = line_with(&mut lines, "UPDATED", &mut seen).await?;
    ingest
        .send_durable(vec![events::close(
            7,
            ClosedBy::Server,
            CloseKind::Rst,
            "server reset the connection while the client was still sending its request",
        )])
        .await?;
    let closed = line_with(&mut lines, "CLOSED", &mut seen).await?;
    for line in &seen {
        assert!(
            line.chars().count() <= 80,
            "{line:?} is wider than 80 in {seen:#?}"
        );
    }
    // One time per line, the ID, the target cut keeping its port.
    assert!(
        opened.contains("     7 ") && opened.contains("…:8443"),
        "{opened}"
    );
    assert!(opened.contains("from 127.0.0.1:50007"), "{opened}");
    // One time per line: its two colons, then the target's and the client's.
    assert_eq!(opened.matches(':').count(), 4, "{opened}");
    // The update says what changed: here the client process.
    assert!(updated.contains("process curl(4242)"), "{updated}");
    assert!(closed.contains("by server rst"), "{closed}");
    drop(child.kill().await);
    Ok(())
}

#[tokio::test]
async fn watches_started_in_the_background_stop_on_sigint() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    for (watch, first) in [("conns", "TIME"), ("held", "watching held packets")] {
        // As a non-interactive shell starts a background job: SIGINT ignored, then exec.
        let mut sh = Command::new("sh");
        sh.args(["-c", "trap '' INT; exec \"$0\" \"$@\""])
            .arg(bin("interpose"))
            .args([watch, "watch"]);
        for_server(&mut sh, &up.grpc);
        let mut child = sh.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        line_with(&mut lines, first, &mut Vec::new()).await?;
        let pid = child.id().context("pid")?;
        std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()?;
        let st = tokio::time::timeout(WAIT, child.wait())
            .await
            .with_context(|| format!("{watch} watch ignored SIGINT"))??;
        assert!(st.success(), "{watch} watch: {st}");
    }
    Ok(())
}

#[tokio::test]
async fn narrow_conns_list_keeps_the_port_the_status_and_the_closer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let mut client = tests::registry_client(&up.grpc, None).await?;
    let mut ingest = Ingest::open(&mut client, "lab1").await?;
    let long_host = "a-rather-long-host-name-for-a-table.service.internal.example.test";
    let big = vec![b'x'; 20_000];
    ingest
        .send_durable(vec![
            events::open(1, 50001, long_host, 18443),
            process_update(1, 4242, "a-long-process-name"),
            events::packet(1, 1, Direction::C2s, &big),
            events::packet(1, 2, Direction::S2c, &big),
            events::close(
                1,
                ClosedBy::Server,
                CloseKind::Rst,
                "server reset the connection while the client was still sending",
            ),
        ])
        .await?;
    let out = interpose_columns(&up.grpc, &["conns", "list"], 80).await?;
    assert!(out.ok, "{}", out.stderr);
    let text = out.stdout;
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "{line:?} in\n{text}");
    }
    let header = text.lines().next().unwrap_or_default();
    for col in ["ID", "TARGET", "STATUS", "CLOSED BY"] {
        assert!(header.contains(col), "{col} missing from\n{text}");
    }
    // The two directions' bytes go together or not at all.
    assert_eq!(header.contains("C2S"), header.contains("S2C"), "{text}");
    let row = text.lines().nth(1).unwrap_or_default();
    assert!(row.contains("…:18443"), "the port was cut:\n{text}");
    assert!(
        row.contains("disconnected") && row.contains("server"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn history_shows_one_packet_and_filters_by_target_time_and_count() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let _ingest = seed(&up.grpc).await?;
    let url = up.grpc.as_str();

    // One stored packet as a hex dump, with what was received before the edit.
    let out = interpose(url, &["history", "show", "1", "2"]).await?;
    assert!(out.ok, "{}", out.stderr);
    let text = &out.stdout;
    assert!(
        text.starts_with("conn 1 seq 2 c2s ") && text.contains("web.test:80: 8 bytes [modified]"),
        "{text}"
    );
    assert!(text.contains("00000000: 73 65 63 72 65 74 3d 32"), "{text}");
    assert!(
        text.contains("received (8 bytes, before the edit):"),
        "{text}"
    );
    assert!(text.contains("|secret=1|"), "{text}");
    for (args, says) in [
        (
            &["history", "show", "1", "99"][..],
            "connection 1 has no packet 99",
        ),
        (
            &["history", "show", "99999", "1"],
            "no connection with ID 99999",
        ),
    ] {
        let out = interpose(url, args).await?;
        assert!(!out.ok, "{args:?}");
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }

    let conns = |v: &Value| -> Vec<(u64, u64)> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["conn_id"].as_u64().unwrap_or(0),
                            p["seq"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let all = conns(&interpose_json(url, &["history", "--json"]).await?);
    assert_eq!(all.len(), 5, "{all:?}");
    for (args, want) in [
        (&["--dst-port", "5432"][..], vec![(2, 1), (2, 2)]),
        (&["--dst-host", "web.test"], vec![(1, 1), (1, 2), (1, 3)]),
        (&["--dst-host", "web.test", "--conn", "2"], vec![]),
        (&["--limit", "2"], all[..2].to_vec()),
        (&["--tail", "1"], all[4..].to_vec()),
        (&["--since", "1h"], all.clone()),
        (&["--until", "2000-01-01T00:00:00Z"], vec![]),
        (&["--since", "2999-01-01T00:00:00Z"], vec![]),
    ] {
        let mut a = vec!["history", "--json"];
        a.extend(args);
        assert_eq!(conns(&interpose_json(url, &a).await?), want, "{args:?}");
    }
    let tail = interpose(url, &["history", "--tail", "1"]).await?;
    assert!(
        tail.stdout.ends_with("last 1 of 5 packets\n"),
        "{}",
        tail.stdout
    );
    let limit = interpose(url, &["history", "--limit", "2"]).await?;
    assert!(
        limit.stdout.ends_with("first 2 packets (--limit)\n"),
        "{}",
        limit.stdout
    );

    // A target column on request.
    let out = interpose_columns(url, &["history", "--columns", "conn,seq,target"], 80).await?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["CONN", "SEQ", "TARGET"]
    );
    assert!(lines[1].ends_with("web.test:80"), "{}", out.stdout);
    assert!(out.stdout.contains("db.test:5432"), "{}", out.stdout);

    // --conn 0 names no connection: refused, as `held forward 0` is.
    let out = interpose(url, &["history", "--conn", "0"]).await?;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("connection IDs start at 1"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test]
async fn clearing_records_says_exports_lose_their_addresses() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let _ingest = seed(&up.grpc).await?;
    let out = interpose(&up.grpc, &["conns", "clear", "2"]).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    assert!(
        out.stdout.starts_with("cleared 1 connection record;")
            && out.stdout.contains("placeholder addresses"),
        "{}",
        out.stdout
    );
    let file = dir.path().join("c.pcap");
    let out = interpose(
        &up.grpc,
        &["export", "--out", &file.to_string_lossy(), "--conn", "2"],
    )
    .await?;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("exported 1 connection, 2 packets, 9 payload bytes")
            && out
                .stderr
                .contains("1 with placeholder addresses (record cleared): 2"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test]
async fn intercept_on_refuses_port_0_and_unknown_connections() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let _ingest = seed(&up.grpc).await?;
    let out = interpose(&up.grpc, &["intercept", "on", "--port", "0"]).await?;
    assert!(!out.ok);
    assert!(out.stderr.contains("--port"), "{}", out.stderr);
    let out = interpose(&up.grpc, &["intercept", "on", "--conn", "99999"]).await?;
    assert!(!out.ok);
    assert_eq!(
        out.stderr.trim(),
        "interpose: --conn 99999: no connection with ID 99999 (`interpose conns list` shows the IDs)"
    );
    let status = interpose_json(&up.grpc, &["intercept", "status", "--json"]).await?;
    assert_eq!(status["enabled"], false, "{status}");
    let out = interpose(&up.grpc, &["intercept", "on", "--conn", "2"]).await?;
    assert!(out.ok, "{}", out.stderr);
    Ok(())
}

/// The log of an `interpose up` that started, served, and stopped on `signal`.
async fn log_of_a_clean_run(dir: &Path, signal: &str, extra: &[&str]) -> anyhow::Result<String> {
    let up = Up::start(&dir.join("data"), extra).await?;
    // A watch attached, as a user's would be.
    let mut watch = command(&up.grpc, &strings(&["conns", "watch", "--json"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(watch.stdout.take().context("stdout")?).lines();
    line_with(&mut lines, "snapshot_end", &mut Vec::new()).await?;
    let log = up.proc.log.clone();
    assert!(up.proc.signal(signal).await?, "clean exit on SIG{signal}");
    drop(watch.kill().await);
    Ok(std::fs::read_to_string(log)?)
}

#[tokio::test]
async fn a_clean_shutdown_logs_no_warning() -> anyhow::Result<()> {
    for signal in ["INT", "TERM"] {
        let dir = tempfile::tempdir()?;
        let log = log_of_a_clean_run(dir.path(), signal, &[]).await?;
        assert!(!log.contains("WARN"), "SIG{signal}:\n{log}");
    }
    // The one warning a user asked for is given once.
    let dir = tempfile::tempdir()?;
    let log = log_of_a_clean_run(dir.path(), "TERM", &["--upstream-insecure"]).await?;
    assert_eq!(log.matches("--upstream-insecure").count(), 1, "{log}");
    Ok(())
}

/// The timestamps of the whole blocks of a pcapng capture written so far, and whether one of
/// its frames carries `marker`.
fn frame_times(bytes: &[u8], marker: &[u8]) -> (Vec<std::time::Duration>, bool) {
    use pcap_file::pcapng::{Block, PcapNgReader};
    let mut times = Vec::new();
    let mut found = false;
    let Ok(mut r) = PcapNgReader::new(bytes) else {
        return (times, false);
    };
    while let Some(Ok(block)) = r.next_block() {
        if let Block::EnhancedPacket(p) = block {
            times.push(p.timestamp);
            found |= p.data.windows(marker.len()).any(|w| w == marker);
        }
    }
    (times, found)
}

#[tokio::test]
async fn a_live_export_writes_a_closed_connection_s_end_before_later_packets() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("data"), &[]).await?;
    let mut client = tests::registry_client(&up.grpc, None).await?;
    let mut ingest = Ingest::open(&mut client, "lab1").await?;
    // One connection that ended, then a later one still open: each event made (and so
    // timestamped) after the one before.
    for e in [
        events::open(1, 50001, "first.test", 80),
        events::packet(1, 1, Direction::C2s, b"early request"),
        events::close(1, ClosedBy::Client, CloseKind::Fin, "client sent FIN"),
        events::open(2, 50002, "second.test", 80),
        events::packet(2, 1, Direction::C2s, b"later request"),
    ] {
        ingest.send_durable(vec![e]).await?;
    }
    let file = dir.path().join("live.pcapng");
    let mut export = command(
        &up.grpc,
        &strings(&["export", "--follow", "--out", &file.to_string_lossy()]),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()?;
    // Wait for the snapshot to be written, then mark its end with a live packet.
    tests::eventually("the snapshot in the live export", || {
        let (times, found) = frame_times(&std::fs::read(&file).unwrap_or_default(), b"later");
        async move { Ok((found && !times.is_empty()).then_some(())) }
    })
    .await?;
    ingest
        .send_durable(vec![events::packet(2, 2, Direction::C2s, b"LAST")])
        .await?;
    let times = tests::eventually("the live packet in the export", || {
        let (times, found) = frame_times(&std::fs::read(&file).unwrap_or_default(), b"LAST");
        async move { Ok(found.then_some(times)) }
    })
    .await?;
    drop(export.kill().await);
    let disorder: Vec<usize> = (1..times.len())
        .filter(|&i| times[i] < times[i - 1])
        .collect();
    assert!(
        disorder.is_empty(),
        "frames out of time order at {disorder:?}: {times:?}"
    );
    Ok(())
}
