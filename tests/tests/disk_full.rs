//! A registry whose disk fills up: records, closes and counters keep flowing, the history
//! that cannot be written is counted and reported (`conns stats`, gRPC health), and
//! recording resumes by itself when space returns.
//!
//! The full disk is a file-size limit set on the running `interpose up` with `prlimit
//! --fsize` (util-linux, no root needed): every write past the limit then fails (EFBIG), as
//! writes fail on a full filesystem, and raising the limit again is space returning.

use std::path::Path;

use proto::common::ConnStatus;
use proxy_core::socks5::Addr;
use tests::{
    Up, connection_stats, eventually, interpose_ok,
    proxy::{all_connections, direction_bytes, echo_through, history, payload},
    registry_client,
};

/// Sets the soft file-size limit of process `pid` (`None`: unlimited).
async fn set_file_size_limit(pid: u32, bytes: Option<u64>) -> anyhow::Result<()> {
    let limit = bytes.map_or_else(|| "unlimited".to_string(), |b| b.to_string());
    let out = tokio::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={limit}:")])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

async fn history_health(url: &str) -> anyhow::Result<i32> {
    let ch = tests::channel(url, None).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    Ok(health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "interpose.registry.v1.History".into(),
        })
        .await?
        .into_inner()
        .status)
}

#[tokio::test]
async fn a_full_disk_stops_only_history_which_is_counted_and_resumes() -> anyhow::Result<()> {
    const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    const NOT_SERVING: i32 =
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let up = Up::start(&data, &[]).await?;
    let socks = up.proc.addr("socks")?;
    let pid = up
        .proc
        .pid()
        .ok_or_else(|| anyhow::anyhow!("up has no pid"))?;
    let echo = tests::proxy::echo_server().await?;
    let url = up.grpc.clone();

    // History first, so that the history log is far larger than sled's files: the limit
    // set at its size then stops history writes and nothing else.
    echo_through(socks, Addr::Ip(echo), &payload(8 << 20, 1)).await?;
    let log = data.join("registry").join("history").join("000001.log");
    eventually("8 MiB each way in the history log", || async {
        Ok((file_len(&log) >= 16 << 20).then_some(()))
    })
    .await?;
    let limit = file_len(&log);
    let db = file_len(&data.join("registry").join("db"));
    anyhow::ensure!(
        db + (4 << 20) < limit,
        "sled's file ({db} bytes) is too close to the limit ({limit})"
    );
    assert_eq!(history_health(&url).await?, SERVING);
    set_file_size_limit(pid, Some(limit)).await?;

    // The disk is "full": 25 connections, every record complete and closed.
    let before = connection_stats(&url).await?.history_packets;
    for i in 0..25u8 {
        echo_through(socks, Addr::Ip(echo), &payload(1000, i)).await?;
    }
    let client = registry_client(&url, None).await?;
    eventually("26 complete records", || async {
        let conns = all_connections(&mut client.clone()).await?;
        let done = conns
            .iter()
            .filter(|c| {
                c.status == ConnStatus::Disconnected as i32
                    && (c.bytes_c2s, c.bytes_s2c) == (1000, 1000)
            })
            .count();
        Ok((conns.len() == 26 && done == 25).then_some(()))
    })
    .await?;
    let full = eventually("the unwritten history counted", || async {
        let s = connection_stats(&url).await?;
        Ok((s.history_unwritten_packets >= 50).then_some(s))
    })
    .await?;
    assert_eq!(full.history_packets, before, "nothing was stored meanwhile");
    assert!(full.history_unwritten_bytes >= 50 * 1000, "{full:?}");
    assert!(
        full.history_failing.starts_with("File too large"),
        "{full:?}"
    );
    assert_eq!(history_health(&url).await?, NOT_SERVING);
    let text = interpose_ok(&url, &["conns", "stats"]).await?;
    assert!(
        text.contains("history cannot be written now: File too large")
            && text.contains("history not written: "),
        "{text}"
    );

    // Space returns: the next packets are recorded, with nothing else done.
    set_file_size_limit(pid, None).await?;
    let after = payload(3000, 99);
    echo_through(socks, Addr::Ip(echo), &after).await?;
    let id = eventually("the record of the connection after", || async {
        let conns = all_connections(&mut client.clone()).await?;
        Ok(conns
            .iter()
            .map(|c| c.id)
            .max()
            .filter(|_| conns.len() == 27))
    })
    .await?;
    let packets = eventually("its history", || async {
        let h = history(&mut client.clone(), id).await?;
        let both = direction_bytes(&h, proto::common::Direction::C2s) == after
            && direction_bytes(&h, proto::common::Direction::S2c) == after;
        Ok(both.then_some(h))
    })
    .await?;
    assert!(!packets.is_empty());
    let s = connection_stats(&url).await?;
    assert_eq!(s.history_failing, "", "{s:?}");
    assert_eq!(s.history_unwritten_packets, full.history_unwritten_packets);
    assert_eq!(history_health(&url).await?, SERVING);
    Ok(())
}
