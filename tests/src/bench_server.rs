//! The benchmarks' server, run as its own process (`bench-server`), as a real server is:
//! with client and server in one process a direct connection could be served by one thread
//! without a single context switch, a setup no proxied connection can have.
//!
//! After the TCP (or TLS) accept the client sends one command byte: `B` (the server writes
//! the bulk size and closes), `E` (echo until EOF); any other byte is echoed once and the
//! server closes first (a fresh-connection round, with TIME_WAIT on the server side so the
//! client's ephemeral ports last).

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::Context;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    process::Command,
};
use tokio_rustls::TlsAcceptor;

use crate::{Proc, bin};

/// Serves `listener` forever; with `acceptor`, over TLS.
pub async fn serve(listener: TcpListener, acceptor: Option<TlsAcceptor>, bulk: u64) {
    while let Ok((s, _)) = listener.accept().await {
        let _ = s.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => session(s, bulk, 256 * 1024).await,
                Some(a) => {
                    if let Ok(tls) = a.accept(s).await {
                        session(tls, bulk, 64 * 1024).await;
                    }
                }
            }
        });
    }
}

/// One connection: a command byte, then what it asks for.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bulk: u64, chunk: usize) {
    let mut cmd = [0u8; 1];
    if s.read_exact(&mut cmd).await.is_err() {
        return;
    }
    match cmd[0] {
        b'B' => {
            let block = vec![0x5au8; chunk];
            let mut left = bulk;
            while left > 0 {
                let n = left.min(chunk as u64) as usize;
                if s.write_all(&block[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
        }
        b'E' => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        other => {
            if s.write_all(&[other]).await.is_err() {
                return;
            }
        }
    }
    let _ = s.shutdown().await;
}

/// A TLS acceptor for the certificate chain and key in the PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let cfg = ServerConfig::builder_with_provider(proxy_core::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// A running `bench-server` process.
pub struct BenchServer {
    /// The process (killed when dropped).
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl BenchServer {
    /// Starts `bench-server` writing `bulk` bytes per bulk request; with `tls` (certificate
    /// and key PEM files), over TLS.
    pub async fn start(dir: &Path, bulk: u64, tls: Option<(&Path, &Path)>) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("bench-server"));
        cmd.arg("--bulk").arg(bulk.to_string());
        if let Some((cert, key)) = tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let proc = Proc::start(cmd, dir.join("bench-server.log")).await?;
        let addr = proc.addr("listen")?;
        Ok(Self { proc, addr })
    }
}
