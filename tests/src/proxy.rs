//! Helpers for the proxy-core end-to-end tests: a `proxy-core` child process, a SOCKS5
//! client (built on proxy-core's own sans-I/O encoder, but driving a real socket), small
//! loopback servers, and registry queries by source port and connection ID.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};
use platform::client::AuthChannel;
use proto::{
    common::{Connection, Direction, Packet},
    registry::{
        GetConnectionRequest, ListConnectionsRequest, SearchHistoryRequest,
        registry_client::RegistryClient,
    },
};
use proxy_core::socks5::{self, Addr, Command as SocksCommand, Greeting, Reply, Request, UserPass};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::Command,
};

use crate::{Proc, WAIT, bin};

/// A running `proxy-core` process.
pub struct ProxyProc {
    /// The process.
    pub proc: Proc,
    /// Its SOCKS address.
    pub socks: SocketAddr,
}

impl ProxyProc {
    /// Starts `proxy-core` on a free loopback port reporting to `registry` as `node`, with
    /// extra arguments and debug logging; its log goes next to `dir`.
    pub async fn start(
        dir: &Path,
        registry: &str,
        node: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_logging(dir, registry, node, extra, "info,proxy_core=debug").await
    }

    /// Like [`ProxyProc::start`] with the `RUST_LOG` filter `log` (benchmarks use `warn`).
    pub async fn start_logging(
        dir: &Path,
        registry: &str,
        node: &str,
        extra: &[&str],
        log: &str,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("proxy-core"));
        cmd.args([
            "--socks",
            "127.0.0.1:0",
            "--registry",
            registry,
            "--node",
            node,
        ])
        .args(extra)
        .env_remove("INTERPOSE_TOKEN")
        .env("RUST_LOG", log);
        // The registry's token, as an operator would pass it (not on the command line); with
        // several replicas (`URL,URL`), the first one's.
        let first = registry.split(',').next().unwrap_or(registry);
        if let Some(token) = crate::token(first) {
            cmd.env("INTERPOSE_TOKEN", token);
        }
        let proc = Proc::start(cmd, dir.join(format!("proxy-{node}.log"))).await?;
        let socks = proc.addr("listen")?;
        Ok(Self { proc, socks })
    }
}

/// The reply to a SOCKS request, and the stream when it succeeded.
pub struct SocksReply {
    /// The reply code.
    pub reply: Reply,
    /// The bound address in the reply.
    pub bound: Addr,
    /// The client stream (after the reply).
    pub stream: TcpStream,
}

/// Reads one message a byte at a time, so that nothing after it (data the server sent right
/// after the reply) is consumed.
async fn read_until<T>(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, socks5::Socks5Error>,
    bound: Duration,
) -> anyhow::Result<T> {
    loop {
        if let Some((m, n)) = parse(buf)? {
            buf.drain(..n);
            return Ok(m);
        }
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(bound, s.read(&mut byte))
            .await
            .context("SOCKS reply timed out")??;
        if n == 0 {
            bail!("proxy closed during the SOCKS handshake");
        }
        buf.push(byte[0]);
    }
}

/// Runs a SOCKS5 handshake on `stream` for `command` to `target`.
pub async fn socks_request(
    stream: TcpStream,
    command: SocksCommand,
    target: Addr,
    auth: Option<(&str, &str)>,
) -> anyhow::Result<SocksReply> {
    socks_request_within(stream, command, target, auth, WAIT).await
}

/// [`socks_request`] waiting at most `bound` for the reply (for a test that keeps the
/// proxy's answer pending on purpose, e.g. behind a stalled name server).
pub async fn socks_request_within(
    mut stream: TcpStream,
    command: SocksCommand,
    target: Addr,
    auth: Option<(&str, &str)>,
    bound: Duration,
) -> anyhow::Result<SocksReply> {
    let mut out = Vec::new();
    let method = if auth.is_some() {
        socks5::METHOD_USERPASS
    } else {
        socks5::METHOD_NONE
    };
    socks5::encode_greeting(
        &Greeting {
            methods: vec![method],
        },
        &mut out,
    );
    stream.write_all(&out).await?;
    let mut choice = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut choice)).await??;
    if choice[1] != method {
        bail!("proxy chose method {:#04x}", choice[1]);
    }
    if let Some((user, pass)) = auth {
        out.clear();
        socks5::encode_userpass(
            &UserPass {
                user: user.as_bytes().to_vec(),
                pass: pass.as_bytes().to_vec(),
            },
            &mut out,
        );
        stream.write_all(&out).await?;
        tokio::time::timeout(WAIT, stream.read_exact(&mut choice)).await??;
        if choice[1] != 0 {
            bail!("authentication failed");
        }
    }
    out.clear();
    socks5::encode_request(
        &Request {
            command,
            addr: target,
        },
        &mut out,
    );
    stream.write_all(&out).await?;
    let mut buf = Vec::new();
    let r = read_until(&mut stream, &mut buf, socks5::parse_reply, bound).await?;
    Ok(SocksReply {
        reply: r.reply,
        bound: r.bound,
        stream,
    })
}

/// Asks a `bench-server` on `s` for its bulk download (`B`) and reads it to the end; the
/// rate in bytes per second, or an error unless exactly `expect` bytes came.
pub async fn bench_download(s: &mut TcpStream, expect: u64) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 256 * 1024];
    let start = std::time::Instant::now();
    s.write_all(b"B").await?;
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    if got != expect {
        bail!("got {got} of {expect} bytes");
    }
    Ok(got as f64 / secs)
}

/// Connects to the proxy at `socks` and asks it to CONNECT to `target`.
pub async fn socks_connect(socks: SocketAddr, target: Addr) -> anyhow::Result<SocksReply> {
    let s = TcpStream::connect(socks).await?;
    socks_request(s, SocksCommand::Connect, target, None).await
}

/// Like [`socks_connect`] but fails unless the reply is success.
pub async fn socks_connected(socks: SocketAddr, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let r = socks_connect(socks, Addr::Ip(target)).await?;
    if r.reply != Reply::Succeeded {
        bail!("SOCKS reply {:?}", r.reply);
    }
    Ok(r.stream)
}

/// CONNECTs through the proxy at `socks` to the echo server at `target`, sends `data`,
/// half-closes, and checks the echo returns exactly `data` before it ends (bounded by
/// [`WAIT`]).
pub async fn echo_through(socks: SocketAddr, target: Addr, data: &[u8]) -> anyhow::Result<()> {
    let r = socks_connect(socks, target.clone()).await?;
    if r.reply != Reply::Succeeded {
        bail!("{target:?}: SOCKS reply {:?}", r.reply);
    }
    let mut s = r.stream;
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(data).await?;
        wr.shutdown().await
    };
    let mut back = Vec::new();
    let (sent, read) = tokio::time::timeout(WAIT, async {
        tokio::join!(send, rd.read_to_end(&mut back))
    })
    .await
    .context("the echo did not end in time")?;
    sent?;
    read?;
    anyhow::ensure!(
        back == data,
        "{target:?}: the echo returned {} of {} bytes",
        back.len(),
        data.len()
    );
    Ok(())
}

/// A loopback TCP listener; `accept` hands out server-side streams.
pub struct Server {
    listener: TcpListener,
    /// Its address.
    pub addr: SocketAddr,
}

impl Server {
    /// Binds 127.0.0.1:0.
    pub async fn bind() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    /// The next connection (bounded wait).
    pub async fn accept(&self) -> anyhow::Result<TcpStream> {
        let (s, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .context("no connection reached the server")??;
        Ok(s)
    }
}

/// A loopback echo server running until the test ends: every connection gets its bytes
/// back until it closes.
pub async fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Reads until EOF (bounded wait).
pub async fn read_to_end(s: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut v = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut v))
        .await
        .context("read_to_end timed out")??;
    Ok(v)
}

/// Reads exactly `n` bytes (bounded wait).
pub async fn read_n(s: &mut TcpStream, n: usize) -> anyhow::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut v))
        .await
        .context("read_exact timed out")??;
    Ok(v)
}

/// Makes the coming drop of `s` send RST (SO_LINGER 0).
pub fn set_abortive(s: &TcpStream) -> anyhow::Result<()> {
    #[allow(deprecated)]
    s.set_linger(Some(Duration::ZERO))?;
    Ok(())
}

/// Every record (following pages).
pub async fn all_connections(
    client: &mut RegistryClient<AuthChannel>,
) -> anyhow::Result<Vec<Connection>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_connections(ListConnectionsRequest {
                filter: None,
                page_size: 0,
                page_token: token,
                newest_first: false,
            })
            .await?
            .into_inner();
        out.extend(page.connections);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// Waits for the record whose client port is `src_port` and for which `pred` holds.
pub async fn wait_conn_by_port(
    client: &mut RegistryClient<AuthChannel>,
    src_port: u16,
    what: &str,
    pred: impl Fn(&Connection) -> bool,
) -> anyhow::Result<Connection> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    loop {
        let conns = all_connections(client).await?;
        if let Some(c) = conns
            .into_iter()
            .find(|c| c.src_port == u32::from(src_port))
        {
            if pred(&c) {
                return Ok(c);
            }
            last = Some(c);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "timed out waiting for the record of port {src_port} to be {what}; last: {last:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until record `id` satisfies `pred`.
pub async fn wait_conn(
    client: &mut RegistryClient<AuthChannel>,
    id: u64,
    what: &str,
    pred: impl Fn(&Connection) -> bool,
) -> anyhow::Result<Connection> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    loop {
        if let Ok(c) = client.get_connection(GetConnectionRequest { id }).await {
            let c = c.into_inner();
            if pred(&c) {
                return Ok(c);
            }
            last = Some(c);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for record {id} to be {what}; last: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every history packet of connection `id`, in order.
pub async fn history(
    client: &mut RegistryClient<AuthChannel>,
    id: u64,
) -> anyhow::Result<Vec<Packet>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .search_history(SearchHistoryRequest {
                conn_id: id,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.packets);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// The bytes of one direction of a history, concatenated.
pub fn direction_bytes(packets: &[Packet], dir: Direction) -> Vec<u8> {
    packets
        .iter()
        .filter(|p| p.direction == dir as i32)
        .flat_map(|p| p.data.iter().copied())
        .collect()
}

/// Deterministic test payload of `n` bytes, different per `salt`.
pub fn payload(n: usize, salt: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

/// Polls until the history of `id` holds `c2s` and `s2c` bytes exactly, with sequence
/// numbers 1, 2, 3, ... and no gap.
pub async fn wait_history(
    client: &mut RegistryClient<AuthChannel>,
    id: u64,
    c2s: &[u8],
    s2c: &[u8],
) -> anyhow::Result<Vec<Packet>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let h = history(client, id).await?;
        let got_c2s = direction_bytes(&h, Direction::C2s);
        let got_s2c = direction_bytes(&h, Direction::S2c);
        if got_c2s == c2s && got_s2c == s2c {
            for (i, p) in h.iter().enumerate() {
                if p.seq != i as u64 + 1 {
                    bail!("history of {id}: packet {i} has seq {}", p.seq);
                }
            }
            return Ok(h);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "history of {id}: c2s {} of {} bytes (equal prefix: {}), s2c {} of {} bytes (equal prefix: {}) in {} packets",
                got_c2s.len(),
                c2s.len(),
                c2s.starts_with(&got_c2s),
                got_s2c.len(),
                s2c.len(),
                s2c.starts_with(&got_s2c),
                h.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PID of the running `proxy-core` started with `--node NODE` (from `/proc/*/cmdline`).
pub fn proxy_pid(node: &str) -> Option<u32> {
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_proxy = args
            .first()
            .is_some_and(|a| a.ends_with(b"/proxy-core") || *a == b"proxy-core");
        if is_proxy
            && args
                .windows(2)
                .any(|w| w[0] == b"--node" && w[1] == node.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}
