//! The benchmarks' server process (see `tests::bench_server`):
//! `bench-server --bulk BYTES [--tls-cert PEM --tls-key PEM]`; prints
//! `ready listen=127.0.0.1:PORT`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut bulk = 1u64 << 30;
    let (mut cert, mut key) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--bulk" => bulk = value()?.parse().context("--bulk: a byte count")?,
            "--tls-cert" => cert = Some(PathBuf::from(value()?)),
            "--tls-key" => key = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let acceptor = match (cert, key) {
        (Some(c), Some(k)) => {
            proxy_core::tls::install_provider();
            Some(tests::bench_server::acceptor(&c, &k)?)
        }
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("ready listen={}", listener.local_addr()?);
    tests::bench_server::serve(listener, acceptor, bulk).await;
    Ok(())
}
