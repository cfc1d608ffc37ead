//! `interpose up` runs every service in one process, and inside it no service is a client of
//! its gRPC port: the proxy's leases, ingest and replays' reads, the intercept queue's
//! connection watch and the exporter's reads all call the registry's service directly. The
//! server logs each call it serves at debug level (`gRPC call method=...`), so a registry
//! call from the process itself would show in its log; this test's own calls go to the
//! other services only, so any registry call in the log is one `up` made to itself.

use anyhow::{Context, ensure};
use proxy_core::socks5::Addr;
use serde_json::Value;
use tests::{
    Up, WAIT, eventually, interpose, interpose_json, interpose_ok,
    tls::{echo, probe_until_held, serve, through},
};
use tokio::io::AsyncReadExt;

/// The registry's calls, as the server's log names them.
const REGISTRY: &str = "/interpose.registry.v1.Registry/";

#[tokio::test]
async fn up_leases_holds_exports_and_replays_without_calling_itself() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start_logging(
        &dir.path().join("data"),
        &["--no-web"],
        "info,platform::accept=debug",
    )
    .await?;

    // The intercept queue follows the registry's records: connected once the snapshot came.
    eventually("the intercept queue following the registry", || async {
        let status = interpose_json(&up.grpc, &["intercept", "status", "--json"]).await?;
        Ok((status["registry_connected"] == Value::Bool(true)).then_some(()))
    })
    .await?;

    // A connection through the proxy (its ID leased) whose client packet is held, then
    // forwarded and echoed.
    interpose_ok(&up.grpc, &["intercept", "on", "--direction", "c2s"]).await?;
    let server = serve(|mut s| async move { echo(&mut s).await }).await?;
    let (mut client, _) = through(&up, Addr::Ip(server)).await?;
    let held = probe_until_held(&mut client, b"probe", &up.grpc).await?;
    let id = held.packet.as_ref().context("the held packet")?.conn_id;
    ensure!(id >= 1, "a leased connection ID: {held:?}");
    interpose_ok(&up.grpc, &["held", "forward", &held.held_id.to_string()]).await?;
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, client.read_exact(&mut back))
        .await
        .context("the forwarded probe was not echoed")??;
    ensure!(&back == b"probe", "echoed {back:?}");
    drop(client);
    interpose_ok(&up.grpc, &["intercept", "off"]).await?;

    // An export of that connection, once its history reached the registry.
    let file = dir.path().join("one.pcap");
    let file_arg = file.to_string_lossy().into_owned();
    let id_arg = id.to_string();
    let summary = eventually("the connection's history in an export", || async {
        let out = interpose(&up.grpc, &["export", "--out", &file_arg, "--conn", &id_arg]).await?;
        ensure!(out.ok, "interpose export: {}", out.stderr);
        let said = format!("{}{}", out.stdout, out.stderr);
        Ok((!said.contains(" 0 packets")).then_some(said))
    })
    .await?;
    ensure!(summary.contains("exported 1 connection"), "{summary}");
    ensure!(std::fs::metadata(&file)?.len() > 24, "an empty capture");

    // A replay of it, which reads its record and history.
    let out = interpose(&up.grpc, &["replay", &id_arg, "--json"]).await?;
    ensure!(out.ok, "interpose replay: {}", out.stderr);
    ensure!(out.stdout.contains("\"finished\""), "{}", out.stdout);

    let log = up.proc.log.clone();
    ensure!(
        up.proc.terminate().await?,
        "interpose up did not exit cleanly"
    );
    let log = std::fs::read_to_string(&log)?;
    let calls: Vec<&str> = log.lines().filter(|l| l.contains("gRPC call")).collect();
    // The log names the calls this test made (so it would name a registry call too) ...
    for ours in [
        "/interpose.intercept.v1.Intercept/GetStatus",
        "/interpose.intercept.v1.Intercept/ListHeld",
        "/interpose.export.v1.Export/ExportCapture",
        "/interpose.replay.v1.Replay/Replay",
    ] {
        ensure!(
            calls.iter().any(|l| l.contains(ours)),
            "no {ours} in the log:\n{}",
            calls.join("\n")
        );
    }
    // ... and no registry call: `up` made none to itself.
    let itself: Vec<&&str> = calls.iter().filter(|l| l.contains(REGISTRY)).collect();
    ensure!(
        itself.is_empty(),
        "interpose up called its own registry over gRPC:\n{itself:#?}"
    );
    Ok(())
}
