//! A plain HTTP server on loopback and curl through a SOCKS port, for the tests that drive
//! a real HTTP client through the proxy.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::WAIT;

/// A loopback HTTP server answering every request with `body`, then closing. The response
/// has no Content-Length (HTTP/1.0): the body ends with the server's FIN, so the server
/// always closes first and a record says so deterministically.
pub async fn http_server(body: &'static str) -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let resp = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}");
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Runs `curl -sS ARGS --socks5-hostname SOCKS URL` (the proxy resolves the host name),
/// bounded by [`WAIT`], and returns its stdout; a failure is an error with curl's stderr.
/// `None` when curl is missing and the developer opted out
/// ([`crate::tools::SKIP_MISSING_TOOLS`]).
pub async fn curl(socks: SocketAddr, args: &[&str], url: &str) -> anyhow::Result<Option<String>> {
    let Some(curl) = crate::tools::required("curl") else {
        return Ok(None);
    };
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(curl)
            .args(["-sS", "--max-time", "15"])
            .args(args)
            .args(["--socks5-hostname", &socks.to_string(), url])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("curl timed out")??;
    if !out.status.success() {
        bail!(
            "curl {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Runs curl with exactly `args` (`-sS` and a time bound added) and the environment
/// variables `env` (proxy variables of the caller's own environment removed), bounded by
/// [`WAIT`]; returns its whole output, success or not. `None` when curl is missing and the
/// developer opted out.
pub async fn curl_output(
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<Option<std::process::Output>> {
    let Some(curl) = crate::tools::required("curl") else {
        return Ok(None);
    };
    let mut cmd = tokio::process::Command::new(curl);
    cmd.args(["-sS", "--max-time", "15"]).args(args);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    let out = tokio::time::timeout(
        WAIT,
        cmd.stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("curl timed out")??;
    Ok(Some(out))
}
