//! One replay run: a SOCKS connection to the proxy's own port (so the new connection is
//! relayed, spliced, recorded and held like any other), the original's client packets sent
//! with the chosen pacing, TLS redone at the original's point, and the server's bytes read
//! meanwhile, streamed out and compared with the original's.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use proto::{
    common::Direction,
    replay::{Comparison, Pace, ReplayEvent, RunFinished, RunStarted, ServerData},
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::{mpsc, watch},
    time::Instant as TokioInstant,
};
use tonic::Status;

use super::{
    Pending,
    compare::Comparer,
    edit::Edits,
    source::{Feed, Recorded, Source},
};
use protocols::socks5::{
    self, Addr, Command, Greeting, Reply, Request, UserPass, encode_greeting, encode_request,
    encode_userpass,
};

/// Longest the SOCKS handshake with the proxy may take (it includes the proxy's connect to
/// the target).
pub const SOCKS_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a run waits at the TLS point for the server's answer to the plaintext preamble
/// (PostgreSQL's `S`, SMTP's `220`).
pub const TLS_POINT_WAIT: Duration = Duration::from_secs(10);
/// Longest the TLS handshake through the proxy may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest any one wait for the server to go quiet may take (a server that never stops
/// sending does not hold a run forever).
pub const MAX_QUIET_WAIT: Duration = Duration::from_secs(30);
/// Read buffer size.
const READ_BUF: usize = 64 * 1024;

/// TLS as the original spoke it.
#[derive(Clone)]
pub struct TlsPlan {
    /// The last packet sent plain (0: TLS from the first byte).
    pub after_seq: u64,
    /// Server bytes the original received before its handshake.
    pub s2c_before: u64,
    /// The name the proxy's leaf is checked against (the SNI, else the target host).
    pub server_name: ServerName<'static>,
    /// The client configuration: the proxy's CA as the only root, the original's ALPN.
    pub config: Arc<rustls::ClientConfig>,
}

/// What every run of one request shares.
pub struct RunPlan {
    /// The proxy's SOCKS address to connect to.
    pub socks: SocketAddr,
    /// The proxy's SOCKS credentials, if it requires them.
    pub auth: Option<(String, String)>,
    /// Where the proxy's replay connections are announced.
    pub pending: Pending,
    /// The original's ID.
    pub original: u64,
    /// Where to connect.
    pub target: Addr,
    /// TLS, when the original was intercepted TLS.
    pub tls: Option<TlsPlan>,
    /// Pacing.
    pub pace: Pace,
    /// Quiet time.
    pub settle: Duration,
    /// Edits to the client packets.
    pub edits: Edits,
    /// The original's packets.
    pub source: Source,
    /// Leave the server's bytes out of the event stream.
    pub omit_data: bool,
}

/// Where one run's events go.
pub type Events = mpsc::Sender<Result<ReplayEvent, Status>>;

/// The server side as the writer sees it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    received: u64,
    last_data: Instant,
    ended: bool,
}

/// Why a run stopped early.
type RunError = String;

/// Makes run `run` of `plan`; always returns its end (with an error when it failed).
pub async fn run(plan: &RunPlan, run: u32, events: &Events) -> RunFinished {
    let started = Instant::now();
    let mut out = Outcome::default();
    let result = drive(plan, run, events, &mut out).await;
    let comparison = out.comparison.take().unwrap_or_else(|| Comparison {
        summary: "not compared: the run never connected".into(),
        ..Default::default()
    });
    RunFinished {
        run,
        conn_id: out.conn_id,
        bytes_sent: out.bytes_sent,
        packets_sent: out.packets_sent,
        bytes_received: out.received,
        elapsed: prost_types::Duration::try_from(started.elapsed()).ok(),
        error: result.err().unwrap_or_default(),
        comparison: Some(comparison),
    }
}

/// What a run got to, kept when it fails part way.
#[derive(Default)]
struct Outcome {
    conn_id: u64,
    bytes_sent: u64,
    packets_sent: u64,
    received: u64,
    comparison: Option<Comparison>,
}

async fn drive(
    plan: &RunPlan,
    run: u32,
    events: &Events,
    out: &mut Outcome,
) -> Result<(), RunError> {
    let (mut tcp, conn_id) = connect(plan).await?;
    out.conn_id = conn_id;
    let _ = events
        .send(Ok(ReplayEvent {
            started: Some(RunStarted {
                run,
                conn_id,
                target: plan.target.to_string(),
                tls: plan.tls.is_some(),
            }),
            ..Default::default()
        }))
        .await;
    let (progress_tx, progress_rx) = watch::channel(Progress {
        received: 0,
        last_data: Instant::now(),
        ended: false,
    });
    let mut inbound = Inbound {
        run,
        events: events.clone(),
        omit_data: plan.omit_data,
        comparer: Comparer::new(),
        feed: plan.source.feed(Direction::S2c),
        feed_done: false,
        fed: 0,
        received: 0,
        progress: progress_tx,
    };
    let mut outbound = Outbound {
        plan,
        packets: plan.source.feed(Direction::C2s),
        held_back: None,
        progress: progress_rx,
        first_ts: None,
        start: TokioInstant::now(),
        sent: 0,
        bytes: 0,
    };
    let result = async {
        match &plan.tls {
            None => {
                let (mut r, mut w) = tcp.split();
                phase(&mut inbound, &mut outbound, &mut r, &mut w, None).await
            }
            Some(tls) => {
                if tls.after_seq > 0 {
                    let (mut r, mut w) = tcp.split();
                    phase(&mut inbound, &mut outbound, &mut r, &mut w, Some(tls)).await?;
                }
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let stream = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    connector.connect(tls.server_name.clone(), tcp),
                )
                .await
                .map_err(|_| format!("TLS handshake through the proxy timed out after {HANDSHAKE_TIMEOUT:?}"))?
                .map_err(|e| {
                    format!("TLS handshake through the proxy failed: {e} (the connection's record says why)")
                })?;
                let (mut r, mut w) = tokio::io::split(stream);
                phase(&mut inbound, &mut outbound, &mut r, &mut w, None).await
            }
        }
    }
    .await;
    out.bytes_sent = outbound.bytes;
    out.packets_sent = outbound.sent;
    out.received = inbound.received;
    out.comparison = Some(inbound.finish().await);
    result
}

/// Connects to the proxy's SOCKS port from an address announced to the proxy as a replay of
/// the original; returns the stream and the new record's ID.
async fn connect(plan: &RunPlan) -> Result<(TcpStream, u64), RunError> {
    let socket = match plan.socks {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("creating a socket: {e}"))?;
    let local = SocketAddr::new(
        if plan.socks.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        },
        0,
    );
    socket
        .bind(local)
        .map_err(|e| format!("binding a local socket: {e}"))?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("binding a local socket: {e}"))?;
    let mut announced = plan.pending.announce(local, plan.original);
    let result = tokio::time::timeout(SOCKS_TIMEOUT, async {
        let mut s = socket
            .connect(plan.socks)
            .await
            .map_err(|e| format!("connecting to the proxy's SOCKS port {}: {e}", plan.socks))?;
        let _ = s.set_nodelay(true);
        socks_connect(&mut s, plan)
            .await
            .map_err(|e| format!("SOCKS CONNECT {} through the proxy: {e}", plan.target))?;
        Ok::<_, String>(s)
    })
    .await;
    // Claimed by the proxy when it opened the record (or never, when it did not get that far).
    plan.pending.withdraw(local);
    let id = announced.try_recv().unwrap_or(0);
    match result {
        Ok(Ok(s)) => Ok((s, id)),
        Ok(Err(e)) => Err(with_record(e, id)),
        Err(_) => Err(with_record(
            format!(
                "the proxy did not connect to {} within {SOCKS_TIMEOUT:?}",
                plan.target
            ),
            id,
        )),
    }
}

fn with_record(e: String, id: u64) -> String {
    if id == 0 {
        e
    } else {
        format!("{e} (record {id} says why)")
    }
}

/// The SOCKS5 client handshake: greeting, credentials when required, CONNECT.
async fn socks_connect(s: &mut TcpStream, plan: &RunPlan) -> Result<(), String> {
    let method = if plan.auth.is_some() { 0x02 } else { 0x00 };
    let mut buf = Vec::new();
    encode_greeting(
        &Greeting {
            methods: vec![method],
        },
        &mut buf,
    );
    s.write_all(&buf).await.map_err(|e| e.to_string())?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice)
        .await
        .map_err(|e| format!("reading the method choice: {e}"))?;
    if choice[1] != method {
        return Err(format!("the proxy refused method {method:#04x}"));
    }
    if let Some((user, pass)) = &plan.auth {
        buf.clear();
        encode_userpass(
            &UserPass {
                user: user.as_bytes().to_vec(),
                pass: pass.as_bytes().to_vec(),
            },
            &mut buf,
        );
        s.write_all(&buf).await.map_err(|e| e.to_string())?;
        let mut status = [0u8; 2];
        s.read_exact(&mut status)
            .await
            .map_err(|e| format!("reading the authentication status: {e}"))?;
        if status[1] != 0 {
            return Err("the proxy refused its own credentials".into());
        }
    }
    buf.clear();
    encode_request(
        &Request {
            command: Command::Connect,
            addr: plan.target.clone(),
        },
        &mut buf,
    );
    s.write_all(&buf).await.map_err(|e| e.to_string())?;
    let mut reply = Vec::with_capacity(32);
    loop {
        let mut chunk = [0u8; 32];
        let n = s
            .read(&mut chunk[..socks5_reply_wanted(&reply)])
            .await
            .map_err(|e| format!("reading the reply: {e}"))?;
        if n == 0 {
            return Err("the proxy closed the connection before replying".into());
        }
        reply.extend_from_slice(&chunk[..n]);
        match socks5::parse_reply(&reply) {
            Ok(Some((msg, _))) if msg.reply == Reply::Succeeded => return Ok(()),
            Ok(Some((msg, _))) => return Err(format!("the proxy replied {:?}", msg.reply)),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed reply: {e}")),
        }
    }
}

/// How many more bytes of a SOCKS reply to read at most: never past its end, so the first
/// server bytes stay in the socket for the run to read.
fn socks5_reply_wanted(have: &[u8]) -> usize {
    // VER REP RSV ATYP, then the address (4, 16, or 1 + len) and 2 port bytes.
    let total = match have.get(3) {
        None => 5,
        Some(0x01) => 10,
        Some(0x04) => 22,
        Some(_) => match have.get(4) {
            None => 5,
            Some(&len) => 7 + usize::from(len),
        },
    };
    total.saturating_sub(have.len()).clamp(1, 32)
}

/// The server side of a run: reads, streams out, compares.
struct Inbound {
    run: u32,
    events: Events,
    omit_data: bool,
    comparer: Comparer,
    feed: Feed,
    feed_done: bool,
    /// Original server bytes fed to the comparer.
    fed: u64,
    received: u64,
    progress: watch::Sender<Progress>,
}

impl Inbound {
    /// Reads until the server ends its side (`Ok`) or the read fails.
    async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<(), String> {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) => {
                    self.progress.send_modify(|p| p.ended = true);
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // A TLS server that closed without close_notify: its end all the same.
                    self.progress.send_modify(|p| p.ended = true);
                    return Ok(());
                }
                Err(e) => {
                    self.progress.send_modify(|p| p.ended = true);
                    return Err(format!("reading from the server: {e}"));
                }
            };
            let data = &buf[..n];
            self.received += n as u64;
            self.progress.send_modify(|p| {
                p.received += n as u64;
                p.last_data = Instant::now();
            });
            self.feed_upto(self.received).await;
            self.comparer.got(data);
            if !self.omit_data {
                let _ = self
                    .events
                    .send(Ok(ReplayEvent {
                        data: Some(ServerData {
                            run: self.run,
                            ts: Some(proto::time::now()),
                            data: Bytes::copy_from_slice(data),
                        }),
                        ..Default::default()
                    }))
                    .await;
            }
        }
    }

    /// Feeds the comparer original packets until it holds `n` bytes or the original ends.
    async fn feed_upto(&mut self, n: u64) {
        while self.fed < n && !self.feed_done && self.comparer.difference().is_none() {
            match self.feed.recv().await {
                Some(Ok(p)) => {
                    self.fed += p.data.len() as u64;
                    self.comparer.expect(p.seq, p.data);
                }
                Some(Err(s)) => {
                    tracing::warn!("replay comparison: {}", s.message());
                    self.feed_done = true;
                }
                None => self.feed_done = true,
            }
        }
    }

    /// The comparison, with one more original packet fed (so a replay that stopped short is
    /// named as such).
    async fn finish(mut self) -> Comparison {
        let n = self.fed.max(self.received) + 1;
        self.feed_upto(n).await;
        self.comparer.finish()
    }
}

/// The client side of a run: the original's packets, edited and paced.
struct Outbound<'a> {
    plan: &'a RunPlan,
    packets: Feed,
    /// A packet read past the end of a phase (the first one after the TLS point).
    held_back: Option<Recorded>,
    progress: watch::Receiver<Progress>,
    /// The first packet's recorded time (for `PACE_RECORDED`).
    first_ts: Option<u64>,
    start: TokioInstant,
    sent: u64,
    bytes: u64,
}

impl Outbound<'_> {
    /// Sends packets through `w` up to the TLS point of `tls` (or all of them), then waits as
    /// the phase's end asks: for the server's answer to the preamble, or for the server to
    /// finish (then half-closes).
    async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        tls: Option<&TlsPlan>,
    ) -> Result<(), String> {
        loop {
            let p = match self.held_back.take() {
                Some(p) => Some(p),
                None => match self.packets.recv().await {
                    Some(p) => Some(p.map_err(|s| s.message().to_string())?),
                    None => None,
                },
            };
            let Some(p) = p else { break };
            if let Some(t) = tls
                && p.seq > t.after_seq
            {
                self.held_back = Some(p);
                break;
            }
            let seq = p.seq;
            let ts = p.ts_nanos;
            let Some(data) = self
                .plan
                .edits
                .apply(seq, p.data)
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            if self.plan.pace == Pace::Wait && self.sent == 0 && seq > 1 {
                // The server spoke first in the original: let it, as it did.
                self.quiet().await;
            }
            self.pace_before(ts).await;
            w.write_all(&data)
                .await
                .map_err(|e| format!("sending packet {seq}: {e}"))?;
            w.flush()
                .await
                .map_err(|e| format!("sending packet {seq}: {e}"))?;
            self.sent += 1;
            self.bytes += data.len() as u64;
            if self.plan.pace == Pace::Wait {
                self.quiet().await;
            }
        }
        match tls {
            Some(t) => {
                // The server's answer to the preamble comes before the handshake may start.
                let want = t.s2c_before;
                let _ = tokio::time::timeout(
                    TLS_POINT_WAIT,
                    self.progress.wait_for(|p| p.received >= want || p.ended),
                )
                .await;
                if self.progress.borrow().received < want {
                    return Err(format!(
                        "the server sent {} of the {want} bytes the original's sent before its \
                         TLS handshake",
                        self.progress.borrow().received
                    ));
                }
                Ok(())
            }
            None => {
                self.quiet().await;
                let _ = w.shutdown().await;
                // What the server still sends after the client's end.
                self.quiet().await;
                Ok(())
            }
        }
    }

    /// `PACE_RECORDED`: waits until this packet's recorded offset from the first.
    async fn pace_before(&mut self, ts: u64) {
        if self.plan.pace != Pace::Recorded {
            return;
        }
        let first = *self.first_ts.get_or_insert(ts);
        if self.sent == 0 {
            self.start = TokioInstant::now();
        }
        let after = ts.saturating_sub(first);
        tokio::time::sleep_until(self.start + Duration::from_nanos(after)).await;
    }

    /// Waits until the server has been quiet for the settle time (counted from the later of
    /// now and its last bytes), or has ended; at most [`MAX_QUIET_WAIT`].
    async fn quiet(&mut self) {
        let settle = self.plan.settle;
        let sent_at = Instant::now();
        let cap = TokioInstant::now() + MAX_QUIET_WAIT;
        loop {
            let p = *self.progress.borrow_and_update();
            if p.ended {
                return;
            }
            let last = p.last_data.max(sent_at);
            let due = TokioInstant::from_std(last + settle).min(cap);
            if TokioInstant::now() >= due {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                r = self.progress.changed() => if r.is_err() { return },
            }
        }
    }
}

/// One phase of a run over one stream (plain, or TLS): the writer sends, the reader reads
/// meanwhile; the phase ends when the writer is done (the reader stops between reads).
async fn phase<R, W>(
    inbound: &mut Inbound,
    outbound: &mut Outbound<'_>,
    r: &mut R,
    w: &mut W,
    tls: Option<&TlsPlan>,
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let reader = inbound.read(r);
    let writer = outbound.send(w, tls);
    tokio::pin!(reader, writer);
    let mut read_end: Option<Result<(), String>> = None;
    loop {
        tokio::select! {
            e = &mut reader, if read_end.is_none() => read_end = Some(e),
            w = &mut writer => {
                return match (w, read_end) {
                    (Ok(()), Some(Err(e))) => Err(e),
                    (w, _) => w,
                };
            }
        }
    }
}
