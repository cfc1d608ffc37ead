//! End-to-end tests of the PCAP export (issue 10): real `interpose up`, `registry-svc` and
//! `export-svc` processes, curl through the SOCKS port, `interpose export` writing the file,
//! and the file read back twice: by pcap-file with every TCP stream reassembled in code, and
//! by tshark (follow and expert analysis), as a Wireshark user would see it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail, ensure};
use pcap_file::{
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader},
};
use proto::{
    common::{CloseKind, ClosedBy, ConnStatus, Connection, Direction, Packet},
    registry::{Event, event::Kind},
};
use tests::{
    Ingest, Registry, Up, WAIT, bin, events, interpose,
    proxy::{all_connections, direction_bytes, history},
    registry_client,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

// ------------------------------------------------------------------------------------------
// Reading a capture back

/// One frame of a capture file.
struct Frame {
    data: Vec<u8>,
    comment: Option<String>,
}

/// A capture read back: its frames, snap length and (pcapng) name records.
struct Capture {
    frames: Vec<Frame>,
    snaplen: u32,
    names: Vec<String>,
}

fn read_capture(path: &Path) -> anyhow::Result<Capture> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(bytes.len() >= 4, "{} is empty", path.display());
    let mut cap = Capture {
        frames: Vec::new(),
        snaplen: 0,
        names: Vec::new(),
    };
    if bytes[..4] == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut r = PcapNgReader::new(&bytes[..])?;
        while let Some(block) = r.next_block() {
            add_block(&mut cap, block?);
        }
    } else {
        let mut r = PcapReader::new(&bytes[..])?;
        cap.snaplen = r.header().snaplen;
        while let Some(p) = r.next_packet() {
            cap.frames.push(Frame {
                data: p?.data.to_vec(),
                comment: None,
            });
        }
    }
    Ok(cap)
}

/// Adds what a pcapng block holds to `cap`.
fn add_block(cap: &mut Capture, block: Block<'_>) {
    match block {
        Block::InterfaceDescription(i) => cap.snaplen = i.snaplen,
        Block::NameResolution(n) => cap.names.push(format!("{:?}", n.records)),
        Block::EnhancedPacket(p) => cap.frames.push(Frame {
            data: p.data.to_vec(),
            comment: p.options.iter().find_map(|o| match o {
                pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption::Comment(c) => {
                    Some(c.to_string())
                }
                _ => None,
            }),
        }),
        _ => {}
    }
}

/// One TCP stream reassembled from a capture.
#[derive(Debug, Default)]
struct TcpStream {
    client: Option<SocketAddr>,
    server: Option<SocketAddr>,
    c2s: Vec<u8>,
    s2c: Vec<u8>,
    /// Next expected sequence number of client and server.
    next: [Option<u32>; 2],
    /// Whether any sequence number was lower than the stream's first (it wrapped).
    wrapped: bool,
    isn: [u32; 2],
    fin: [bool; 2],
    rst: [bool; 2],
    comment: Option<String>,
}

/// The one's-complement sum used by IP, TCP and UDP.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u64;
    for part in parts {
        for c in part.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Parses every frame as Ethernet/IP/TCP, checks lengths, checksums, the MTU and the
/// sequence and acknowledgement numbers, and reassembles each stream (in order of its SYN).
fn reassemble(cap: &Capture) -> anyhow::Result<Vec<TcpStream>> {
    let mut streams: Vec<TcpStream> = Vec::new();
    let mut index: HashMap<(SocketAddr, SocketAddr), usize> = HashMap::new();
    for (n, f) in cap.frames.iter().enumerate() {
        let d = &f.data;
        ensure!(
            d.len() <= 1514,
            "frame {n} is {} bytes: over the MTU",
            d.len()
        );
        let ethertype = u16::from_be_bytes([d[12], d[13]]);
        let ip = &d[14..];
        let (src, dst, proto, l4, pseudo_len): (IpAddr, IpAddr, u8, &[u8], Vec<u8>) =
            match ethertype {
                0x0800 => {
                    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                    ensure!(total == ip.len(), "frame {n}: IPv4 total length {total}");
                    ensure!(
                        checksum(&[&ip[..20]]) == 0,
                        "frame {n}: IPv4 header checksum"
                    );
                    let s: [u8; 4] = ip[12..16].try_into()?;
                    let t: [u8; 4] = ip[16..20].try_into()?;
                    let mut pseudo = ip[12..20].to_vec();
                    pseudo.extend_from_slice(&[0, ip[9]]);
                    pseudo.extend_from_slice(&((total - 20) as u16).to_be_bytes());
                    (s.into(), t.into(), ip[9], &ip[20..], pseudo)
                }
                0x86dd => {
                    let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
                    ensure!(len + 40 == ip.len(), "frame {n}: IPv6 payload length {len}");
                    let s: [u8; 16] = ip[8..24].try_into()?;
                    let t: [u8; 16] = ip[24..40].try_into()?;
                    let mut pseudo = ip[8..40].to_vec();
                    pseudo.extend_from_slice(&(len as u32).to_be_bytes());
                    pseudo.extend_from_slice(&[0, 0, 0, ip[6]]);
                    (s.into(), t.into(), ip[6], &ip[40..], pseudo)
                }
                other => bail!("frame {n}: ethertype {other:#x}"),
            };
        ensure!(proto == 6, "frame {n}: not TCP");
        ensure!(checksum(&[&pseudo_len, l4]) == 0, "frame {n}: TCP checksum");
        let port = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
        let word = |i: usize| u32::from_be_bytes([l4[i], l4[i + 1], l4[i + 2], l4[i + 3]]);
        let (from, to) = (SocketAddr::new(src, port(0)), SocketAddr::new(dst, port(2)));
        let (seq, ack, flags) = (word(4), word(8), l4[13]);
        let payload = &l4[usize::from(l4[12] >> 4) * 4..];
        ensure!(
            payload.len() <= 1460,
            "frame {n}: segment of {}",
            payload.len()
        );
        let (syn, fin, rst, has_ack) = (
            flags & 2 != 0,
            flags & 1 != 0,
            flags & 4 != 0,
            flags & 16 != 0,
        );
        if syn && !has_ack {
            ensure!(!index.contains_key(&(from, to)), "frame {n}: second SYN");
            index.insert((from, to), streams.len());
            index.insert((to, from), streams.len());
            streams.push(TcpStream {
                client: Some(from),
                server: Some(to),
                next: [Some(seq.wrapping_add(1)), None],
                isn: [seq, 0],
                comment: f.comment.clone(),
                ..Default::default()
            });
            continue;
        }
        let i = *index
            .get(&(from, to))
            .with_context(|| format!("frame {n}: data before the handshake ({from} -> {to})"))?;
        let s = &mut streams[i];
        let (me, peer) = if Some(from) == s.client {
            (0, 1)
        } else {
            (1, 0)
        };
        if syn {
            ensure!(s.next[1].is_none(), "frame {n}: second SYN-ACK");
            s.next[1] = Some(seq.wrapping_add(1));
            s.isn[1] = seq;
        } else {
            let want = s.next[me].with_context(|| format!("frame {n}: before the SYN-ACK"))?;
            ensure!(seq == want, "frame {n}: seq {seq}, expected {want}");
            ensure!(
                s.next[0].is_some() && s.next[1].is_some(),
                "frame {n}: before the handshake"
            );
            if seq < s.isn[me] {
                s.wrapped = true;
            }
            let consumed = payload.len() as u32 + u32::from(fin);
            s.next[me] = Some(seq.wrapping_add(consumed));
            if me == 0 {
                s.c2s.extend_from_slice(payload);
            } else {
                s.s2c.extend_from_slice(payload);
            }
        }
        if has_ack {
            ensure!(
                Some(ack) == s.next[peer],
                "frame {n}: ACK {ack} of unseen data"
            );
        }
        s.fin[me] |= fin;
        s.rst[me] |= rst;
    }
    Ok(streams)
}

// ------------------------------------------------------------------------------------------
// tshark

/// Whether tshark is here to read the captures: a missing tshark fails the test (`.ci/run`
/// installs it) unless the developer opted out (`INTERPOSE_TEST_SKIP_MISSING_TOOLS=1`), in
/// which case only the tshark checks are skipped.
fn tshark() -> Option<std::path::PathBuf> {
    tests::tools::required("tshark")
}

async fn run_tshark(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("tshark")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("tshark timed out")??;
    ensure!(
        out.status.success(),
        "tshark {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `tshark -z follow,tcp,raw,N`: the bytes of each side (first node = the client).
async fn tshark_follow(file: &Path, stream: usize) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let out = run_tshark(&[
        "-r",
        &file.display().to_string(),
        "-q",
        "-z",
        &format!("follow,tcp,raw,{stream}"),
    ])
    .await?;
    let (mut c2s, mut s2c) = (Vec::new(), Vec::new());
    let body = out
        .split("Node 1:")
        .nth(1)
        .context("no Node 1 line in tshark follow output")?;
    for line in body.lines().skip(1) {
        if line.starts_with("====") {
            break;
        }
        let (target, hex) = match line.strip_prefix('\t') {
            Some(h) => (&mut s2c, h),
            None => (&mut c2s, line),
        };
        for i in (0..hex.len()).step_by(2) {
            target.push(u8::from_str_radix(&hex[i..i + 2], 16)?);
        }
    }
    Ok((c2s, s2c))
}

/// tshark's expert analysis: the entry lines of each section ("Errors", "Warnings",
/// "Notes", "Chats", "Comments").
async fn tshark_expert(file: &Path) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let out = run_tshark(&["-r", &file.display().to_string(), "-q", "-z", "expert"]).await?;
    let mut sections: HashMap<String, Vec<String>> = HashMap::new();
    let mut current = None;
    for line in out.lines() {
        if let Some((name, _)) = line.split_once(" (").filter(|_| !line.starts_with(' ')) {
            current = Some(name.to_string());
            sections.entry(name.to_string()).or_default();
        } else if let Some(name) = current.as_ref().filter(|_| is_entry(line)) {
            sections
                .entry(String::clone(name))
                .or_default()
                .push(line.trim().to_string());
        }
    }
    Ok(sections)
}

/// Whether a line of tshark's expert output is an entry (not a heading or column header).
fn is_entry(line: &str) -> bool {
    line.starts_with(' ') && !line.contains("Frequency")
}

/// Fails when tshark's expert analysis reports any warning or error.
async fn tshark_expert_clean(file: &Path) -> anyhow::Result<()> {
    let expert = tshark_expert(file).await?;
    ensure!(
        expert.contains_key("Chats"),
        "no expert output for {}: {expert:?}",
        file.display()
    );
    // tshark 4.0 names the warning section "Warns"; later releases "Warnings".
    for level in ["Errors", "Warns", "Warnings"] {
        ensure!(
            !expert.contains_key(level),
            "tshark expert analysis of {}: {expert:?}",
            file.display()
        );
    }
    Ok(())
}

/// Checks every stream of `file` with tshark against the reassembled `streams`.
async fn tshark_agrees(file: &Path, streams: &[TcpStream]) -> anyhow::Result<()> {
    for (i, s) in streams.iter().enumerate() {
        let (c2s, s2c) = tshark_follow(file, i).await?;
        ensure!(c2s == s.c2s, "tshark stream {i}: client bytes differ");
        ensure!(s2c == s.s2c, "tshark stream {i}: server bytes differ");
    }
    tshark_expert_clean(file).await
}

// ------------------------------------------------------------------------------------------
// Servers, clients and the export command

/// A loopback HTTP/1.1 server answering every request with `hello from PATH`, plain or (with
/// an acceptor) over TLS, closing after the response.
async fn http_server(tls: Option<tokio_rustls::TlsAcceptor>) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let served = match tls {
                    Some(a) => match a.accept(s).await {
                        Ok(t) => answer(t).await,
                        Err(e) => Err(e.into()),
                    },
                    None => answer(s).await,
                };
                if let Err(e) = served {
                    eprintln!("test server: {e}");
                }
            });
        }
    });
    Ok(addr)
}

async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
) -> anyhow::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        ensure!(n > 0, "request ended early");
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req);
    let path = text.split_whitespace().nth(1).unwrap_or("?").to_string();
    // A body of a few segments, so streams have more than one full-size segment.
    let body = format!("hello from {path}\n{}", "x".repeat(5000));
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await?;
    Ok(())
}

/// A TLS acceptor with a self-signed certificate for localhost (the proxy runs with
/// `--upstream-insecure`).
fn tls_acceptor() -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    proxy_core::tls::install_provider();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(proxy_core::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// curl (HTTP/1.1) through `up`'s SOCKS port, trusting its CA; `None` when curl is
/// missing and the developer opted out.
async fn curl(up: &Up, url: &str) -> anyhow::Result<Option<String>> {
    let ca = up.proc.field("ca").context("ca= in the ready line")?;
    tests::http::curl(up.proc.addr("socks")?, &["--http1.1", "--cacert", &ca], url).await
}

/// Waits until every record is closed and its history holds all its counted bytes; returns
/// the records with their histories.
async fn settled(url: &str, count: usize) -> anyhow::Result<Vec<(Connection, Vec<Packet>)>> {
    let client = registry_client(url, None).await?;
    tests::eventually("closed records with complete histories", || {
        let mut client = client.clone();
        async move {
            let conns = all_connections(&mut client).await?;
            if conns.len() < count {
                return Ok(None);
            }
            let mut out = Vec::new();
            for c in conns {
                let h = history(&mut client, c.id).await?;
                let complete = c.status == ConnStatus::Disconnected as i32
                    && direction_bytes(&h, Direction::C2s).len() as u64 == c.bytes_c2s
                    && direction_bytes(&h, Direction::S2c).len() as u64 == c.bytes_s2c;
                if !complete {
                    return Ok(None);
                }
                out.push((c, h));
            }
            Ok(Some(out))
        }
    })
    .await
}

/// Runs `interpose export --out FILE ARGS` against `server`; returns the file and the
/// summary line.
async fn export(
    server: &str,
    dir: &Path,
    name: &str,
    args: &[&str],
) -> anyhow::Result<(PathBuf, String)> {
    let file = dir.join(name);
    let mut all = vec!["export", "--out"];
    let path = file.display().to_string();
    all.push(&path);
    all.extend_from_slice(args);
    let out = interpose(server, &all).await?;
    ensure!(out.ok, "interpose {all:?} failed: {}", out.stderr);
    Ok((file, out.stderr))
}

/// Asserts each recorded connection is one stream whose directions equal its history.
fn assert_streams_match(
    streams: &[TcpStream],
    recorded: &[(Connection, Vec<Packet>)],
) -> anyhow::Result<()> {
    ensure!(
        streams.len() == recorded.len(),
        "{} streams for {} connections",
        streams.len(),
        recorded.len()
    );
    for (s, (c, h)) in streams.iter().zip(recorded) {
        ensure!(
            s.c2s == direction_bytes(h, Direction::C2s),
            "conn {}: client bytes",
            c.id
        );
        ensure!(
            s.s2c == direction_bytes(h, Direction::S2c),
            "conn {}: server bytes",
            c.id
        );
        ensure!(
            s.fin == [true, true],
            "conn {}: both sides send FIN: {:?}",
            c.id,
            s.fin
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_through_curl_exports_streams_that_reassemble_and_tshark_reads_cleanly()
-> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &[]).await?;
    let server = http_server(None).await?;
    for path in ["/one", "/two"] {
        let Some(body) = curl(&up, &format!("http://localhost:{}{path}", server.port())).await?
        else {
            return Ok(());
        };
        assert!(body.starts_with(&format!("hello from {path}")), "{body}");
    }
    let recorded = settled(&up.grpc, 2).await?;
    let out = tempfile::tempdir()?;

    let (pcap, summary) = export(&up.grpc, out.path(), "plain.pcap", &[]).await?;
    assert!(
        summary.contains("exported 2 connections"),
        "summary: {summary}"
    );
    let cap = read_capture(&pcap)?;
    assert!(
        cap.snaplen <= 262_144 && cap.snaplen > 0,
        "snaplen {}",
        cap.snaplen
    );
    let streams = reassemble(&cap)?;
    assert_streams_match(&streams, &recorded)?;
    for (s, (c, _)) in streams.iter().zip(&recorded) {
        assert_eq!(s.client.map(|a| a.port()), Some(c.src_port as u16));
        assert_eq!(s.server.map(|a| a.port()), Some(server.port()));
    }

    let (ng, _) = export(&up.grpc, out.path(), "plain.pcapng", &["--pcapng"]).await?;
    let cap = read_capture(&ng)?;
    let streams = reassemble(&cap)?;
    assert_streams_match(&streams, &recorded)?;
    for (s, (c, _)) in streams.iter().zip(&recorded) {
        let comment = s.comment.as_deref().context("comment on the first frame")?;
        assert!(
            comment.contains(&format!("interpose connection {};", c.id)),
            "{comment}"
        );
        assert!(comment.contains("target localhost:"), "{comment}");
        assert!(comment.contains("closed by "), "{comment}");
    }
    assert!(
        cap.names.iter().any(|n| n.contains("localhost")),
        "{:?}",
        cap.names
    );

    if tshark().is_some() {
        tshark_agrees(&pcap, &streams).await?;
        tshark_agrees(&ng, &streams).await?;
        let hosts = run_tshark(&["-r", &ng.display().to_string(), "-q", "-z", "hosts"]).await?;
        assert!(
            hosts.contains("127.0.0.1\tlocalhost"),
            "tshark hosts: {hosts}"
        );
        let comments = run_tshark(&[
            "-r",
            &ng.display().to_string(),
            "-Y",
            "frame.comment",
            "-T",
            "fields",
            "-e",
            "frame.comment",
        ])
        .await?;
        assert_eq!(comments.lines().count(), 2, "tshark comments: {comments}");
    }

    // Cleared records: the history still exports, with placeholder addresses and ports.
    let cleared = interpose(&up.grpc, &["conns", "clear", "--all"]).await?;
    assert!(cleared.ok, "{}", cleared.stderr);
    let (file, summary) = export(&up.grpc, out.path(), "cleared.pcap", &[]).await?;
    let ids: Vec<String> = recorded.iter().map(|(c, _)| c.id.to_string()).collect();
    assert!(
        summary.contains(&format!(
            "2 with placeholder addresses (record cleared): {}",
            ids.join(" ")
        )),
        "summary: {summary}"
    );
    let streams = reassemble(&read_capture(&file)?)?;
    assert_streams_match(&streams, &recorded)?;
    for (s, (c, _)) in streams.iter().zip(&recorded) {
        let [hi, lo] = (c.id as u16).to_be_bytes();
        let client = s.client.context("client")?;
        assert_eq!(s.server, Some(SocketAddr::from(([198, 19, hi, lo], 9))));
        assert_eq!(client.ip(), IpAddr::from([198, 18, hi, lo]));
        assert_eq!(client.port(), 49152 + ((c.id >> 16) % 16384) as u16);
    }
    if tshark().is_some() {
        tshark_agrees(&file, &streams).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_tls_exports_the_decrypted_http_on_the_mapped_port() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-insecure"]).await?;
    let server = http_server(Some(tls_acceptor()?)).await?;
    let Some(body) = curl(&up, &format!("https://localhost:{}/secret", server.port())).await?
    else {
        return Ok(());
    };
    assert!(body.starts_with("hello from /secret"), "{body}");
    let recorded = settled(&up.grpc, 1).await?;
    assert!(recorded[0].0.tls, "{:?}", recorded[0].0);
    let out = tempfile::tempdir()?;
    let map = format!("{}=80", server.port());
    let (ng, _) = export(
        &up.grpc,
        out.path(),
        "tls.pcapng",
        &["--pcapng", "--decrypted-port", &map],
    )
    .await?;
    let cap = read_capture(&ng)?;
    let streams = reassemble(&cap)?;
    assert_streams_match(&streams, &recorded)?;
    assert!(streams[0].c2s.starts_with(b"GET /secret HTTP/1.1\r\n"));
    assert_eq!(streams[0].server.map(|a| a.port()), Some(80));
    let comment = streams[0].comment.as_deref().context("comment")?;
    assert!(comment.contains("sni localhost"), "{comment}");
    assert!(
        comment.contains(&format!("server port {} shown as 80", server.port())),
        "{comment}"
    );
    if tshark().is_some() {
        tshark_agrees(&ng, &streams).await?;
        // On port 80 Wireshark dissects the decrypted bytes as HTTP.
        let http = run_tshark(&[
            "-r",
            &ng.display().to_string(),
            "-Y",
            "http.request",
            "-T",
            "fields",
            "-e",
            "http.request.uri",
        ])
        .await?;
        assert_eq!(http.trim(), "/secret");
    }
    Ok(())
}

/// A standalone registry and export-svc, with connections ingested the way a proxy would.
struct Standalone {
    registry: Registry,
    export: tests::Proc,
    url: String,
}

impl Standalone {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let registry = Registry::start(&dir.join("reg")).await?;
        let tests::Side { proc: export, url } =
            tests::Side::start("export-svc", dir, &registry.url, &[]).await?;
        Ok(Self {
            registry,
            export,
            url,
        })
    }
}

fn packet_event(conn_id: u64, seq: u64, dir: Direction, p: Packet) -> Event {
    Event {
        kind: Some(Kind::Packet(Packet {
            conn_id,
            seq,
            direction: dir as i32,
            ts: Some(proto::time::now()),
            ..p
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_numbers_wrap_and_a_packet_over_64_kib_is_cut_into_mtu_segments()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let svc = Standalone::start(dir.path()).await?;
    assert!(
        svc.export
            .ready
            .starts_with("ready export-svc listen=127.0.0.1:")
    );
    let big = tests::proxy::payload(70_000, 3);
    let reply = tests::proxy::payload(3_000, 9);
    let mut ingest = Ingest::open(&mut svc.registry.client().await?, "node-a").await?;
    ingest
        .send_durable(vec![
            events::open(1, 40001, "big.example", 23456),
            events::packet(1, 1, Direction::C2s, &big),
            events::packet(1, 2, Direction::S2c, &reply),
            events::close(1, ClosedBy::Server, CloseKind::Rst, "server reset"),
        ])
        .await?;
    let isn = (u32::MAX - 5_000).to_string();
    let (file, summary) = export(
        &svc.url,
        dir.path(),
        "wrap.pcap",
        &["--conn", "1", "--initial-seq", &isn],
    )
    .await?;
    assert!(
        summary.contains("exported 1 connection, 2 packets, 73000 payload bytes"),
        "{summary}"
    );
    let cap = read_capture(&file)?;
    assert!(cap.snaplen <= 262_144);
    let streams = reassemble(&cap)?;
    assert_eq!(streams.len(), 1);
    let s = &streams[0];
    assert_eq!(s.c2s, big);
    assert_eq!(s.s2c, reply);
    assert!(s.wrapped, "the sequence numbers wrap past 2^32");
    assert_eq!(s.rst, [false, true], "the server resets");
    let full = cap.frames.iter().filter(|f| f.data.len() == 1514).count();
    assert_eq!(full, 70_000 / 1460 + 3_000 / 1460, "full-size segments");
    if tshark().is_some() {
        for (i, s) in streams.iter().enumerate() {
            let (c2s, s2c) = tshark_follow(&file, i).await?;
            assert!(c2s == s.c2s && s2c == s.s2c, "tshark follow differs");
        }
        // The RST itself is a tshark warning ("Connection reset"); nothing else may be.
        let expert = tshark_expert(&file).await?;
        assert!(!expert.contains_key("Errors"), "{expert:?}");
        let warnings = expert
            .get("Warns")
            .or(expert.get("Warnings"))
            .with_context(|| format!("the RST warning: {expert:?}"))?;
        assert_eq!(warnings.len(), 1, "{expert:?}");
        assert!(warnings[0].contains("Connection reset (RST)"), "{expert:?}");
    }
    // An ID with neither record nor history is refused by name, and no file is left.
    let missing = dir.path().join("missing.pcap");
    let out = interpose(
        &svc.url,
        &[
            "export",
            "--out",
            &missing.display().to_string(),
            "--conn",
            "77",
        ],
    )
    .await?;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("connection 77 has neither a record nor history"),
        "{}",
        out.stderr
    );
    assert!(!missing.exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_packets_export_as_sent_and_with_original_as_received() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let svc = Standalone::start(dir.path()).await?;
    let mut ingest = Ingest::open(&mut svc.registry.client().await?, "node-a").await?;
    let edited = Packet {
        data: b"GET /edited".to_vec().into(),
        modified: true,
        original: b"GET /original".to_vec().into(),
        ..Default::default()
    };
    let dropped = Packet {
        modified: true,
        dropped: true,
        original: b" and dropped".to_vec().into(),
        ..Default::default()
    };
    let plain = Packet {
        data: b"OK".to_vec().into(),
        ..Default::default()
    };
    ingest
        .send_durable(vec![
            events::open(2, 40002, "127.0.0.1", 80),
            packet_event(2, 1, Direction::C2s, edited),
            packet_event(2, 2, Direction::C2s, dropped),
            packet_event(2, 3, Direction::S2c, plain),
            events::close(2, ClosedBy::Client, CloseKind::Fin, "client sent FIN"),
        ])
        .await?;
    let (sent, _) = export(&svc.url, dir.path(), "sent.pcap", &[]).await?;
    let streams = reassemble(&read_capture(&sent)?)?;
    assert_eq!(streams[0].c2s, b"GET /edited");
    assert_eq!(streams[0].s2c, b"OK");
    assert_eq!(streams[0].fin, [true, true]);
    let (received, summary) = export(&svc.url, dir.path(), "orig.pcap", &["--original"]).await?;
    assert!(summary.contains("3 packets"), "{summary}");
    let streams = reassemble(&read_capture(&received)?)?;
    assert_eq!(streams[0].c2s, b"GET /original and dropped");
    assert_eq!(streams[0].s2c, b"OK");
    if tshark().is_some() {
        tshark_agrees(&sent, &reassemble(&read_capture(&sent)?)?).await?;
        tshark_agrees(&received, &streams).await?;
    }
    Ok(())
}

/// The UDP payloads of a capture, each with its ports, checksums verified.
fn udp_datagrams(cap: &Capture) -> anyhow::Result<Vec<(u16, u16, Vec<u8>)>> {
    let mut out = Vec::new();
    for (n, f) in cap.frames.iter().enumerate() {
        let ip = &f.data[14..];
        ensure!(ip[0] == 0x45 && ip[9] == 17, "frame {n}: not IPv4/UDP");
        ensure!(
            checksum(&[&ip[..20]]) == 0,
            "frame {n}: IPv4 header checksum"
        );
        let udp = &ip[20..];
        let mut pseudo = ip[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        ensure!(checksum(&[&pseudo, udp]) == 0, "frame {n}: UDP checksum");
        let port = |i: usize| u16::from_be_bytes([udp[i], udp[i + 1]]);
        ensure!(usize::from(port(4)) == udp.len(), "frame {n}: UDP length");
        out.push((port(0), port(2), udp[8..].to_vec()));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_time_range_and_udp_associations_select_and_frame_what_was_asked()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let svc = Standalone::start(dir.path()).await?;
    let mut ingest = Ingest::open(&mut svc.registry.client().await?, "node-a").await?;
    let mut udp = events::open(4, 40004, "dns.example", 53);
    if let Some(Kind::Opened(c)) = &mut udp.kind {
        c.transport = proto::common::Transport::Udp as i32;
    }
    ingest
        .send_durable(vec![
            events::open(3, 40003, "a.example", 23456),
            events::packet(3, 1, Direction::C2s, b"to a"),
            udp,
            events::packet(4, 1, Direction::C2s, b"query"),
            events::packet(4, 2, Direction::S2c, b"answer"),
            events::open(5, 40005, "b.example", 23456),
            events::packet(5, 1, Direction::C2s, b"to b"),
        ])
        .await?;

    let (file, summary) =
        export(&svc.url, dir.path(), "a.pcap", &["--dst-host", "a.example"]).await?;
    assert!(summary.contains("exported 1 connection,"), "{summary}");
    let streams = reassemble(&read_capture(&file)?)?;
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].c2s, b"to a");
    assert_eq!(
        streams[0].fin,
        [false, false],
        "an active connection does not end"
    );

    let (file, _) = export(&svc.url, dir.path(), "udp.pcap", &["--conn", "4"]).await?;
    let datagrams = udp_datagrams(&read_capture(&file)?)?;
    assert_eq!(
        datagrams,
        vec![
            (40004, 53, b"query".to_vec()),
            (53, 40004, b"answer".to_vec())
        ]
    );

    let (_, summary) = export(
        &svc.url,
        dir.path(),
        "later.pcap",
        &["--since", "2999-01-01T00:00:00Z"],
    )
    .await?;
    assert!(summary.contains("exported 0 connections"), "{summary}");
    let (_, summary) = export(
        &svc.url,
        dir.path(),
        "all.pcap",
        &["--until", "2999-01-01T00:00:00Z"],
    )
    .await?;
    assert!(
        summary.contains("exported 3 connections, 4 packets"),
        "{summary}"
    );
    let bad = interpose(
        &svc.url,
        &["export", "--out", "x.pcap", "--since", "yesterday"],
    )
    .await?;
    assert!(
        !bad.ok && bad.stderr.contains("not an RFC 3339 time"),
        "{}",
        bad.stderr
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Live export (`interpose export --follow --out -`)

/// The complete blocks of a pcapng stream read so far: fails unless it starts with a section
/// header and then an interface description, as a reader joining at any time needs.
fn parse_live(bytes: &[u8]) -> anyhow::Result<Capture> {
    let mut cap = Capture {
        frames: Vec::new(),
        snaplen: 0,
        names: Vec::new(),
    };
    let (mut rest, mut parser) = pcap_file::pcapng::PcapNgParser::new(bytes)
        .context("the live export does not start with a section header block")?;
    let mut first = true;
    loop {
        match parser.next_block(rest) {
            Ok((r, block)) => {
                ensure!(
                    !first || matches!(block, Block::InterfaceDescription(_)),
                    "the block after the section header is not the interface description"
                );
                first = false;
                add_block(&mut cap, block);
                rest = r;
            }
            Err(pcap_file::PcapError::IncompleteBuffer) => return Ok(cap),
            Err(e) => bail!("live export: {e}"),
        }
    }
}

/// `interpose export --follow --out -` against `server`, its stdout read by a thread into a
/// buffer as it comes.
struct LiveExport {
    child: std::process::Child,
    out: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl LiveExport {
    /// Starts it with `extra` options.
    fn start(server: &str, log: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let (child, stdout) = Self::spawn(server, log, extra)?;
        Self::read_all(child, stdout)
    }

    /// The export process, its stdout not read yet.
    fn spawn(
        server: &str,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<(std::process::Child, std::process::ChildStdout)> {
        let mut cmd = std::process::Command::new(bin("interpose"));
        cmd.args(["export", "--follow", "--out", "-", "--server", server])
            .args(extra)
            .env_remove("INTERPOSE_TOKEN")
            .env_remove("INTERPOSE_SERVER")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log)?);
        if let Some(file) = tests::token_file(server) {
            cmd.env("INTERPOSE_TOKEN_FILE", file);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().context("piped stdout")?;
        Ok((child, stdout))
    }

    /// Reads `stdout` into the buffer on a thread as it comes.
    fn read_all(
        child: std::process::Child,
        mut stdout: std::process::ChildStdout,
    ) -> anyhow::Result<Self> {
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        Ok(Self { child, out })
    }

    fn bytes(&self) -> Vec<u8> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the streams read so far satisfy `done`; fails if the export exits.
    async fn until(
        &mut self,
        what: &str,
        done: impl Fn(&[TcpStream]) -> bool,
    ) -> anyhow::Result<Vec<TcpStream>> {
        let out = self.out.clone();
        let mut child_status = || self.child.try_wait();
        tests::eventually(what, || {
            let exited = child_status();
            let bytes = out.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let read = match exited {
                Ok(Some(st)) => Err(anyhow::anyhow!(
                    "the live export exited ({st}) while waiting for {what}"
                )),
                Ok(None) if bytes.is_empty() => Ok(None),
                Ok(None) => parse_live(&bytes)
                    .and_then(|cap| reassemble(&cap))
                    .map(|streams| done(&streams).then_some(streams)),
                Err(e) => Err(e.into()),
            };
            async move { read }
        })
        .await
    }

    /// Sends SIGINT (Ctrl-C) and returns whether it exited 0.
    async fn interrupt(mut self) -> anyhow::Result<bool> {
        std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        let deadline = tokio::time::Instant::now() + tests::WAIT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st.success());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the live export still runs after SIGINT"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LiveExport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_live_traffic_after_the_earlier_history_and_tshark_reads_it_cleanly()
-> anyhow::Result<()> {
    use tests::proxy::{Server, read_n, read_to_end, socks_connected};

    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--upstream-insecure"]).await?;
    let socks = up.proc.addr("socks")?;
    let http = http_server(None).await?;
    let tls = http_server(Some(tls_acceptor()?)).await?;

    // Recorded before the export starts: a late reader gets it after the file header.
    if curl(&up, &format!("http://localhost:{}/early", http.port()))
        .await?
        .is_none()
    {
        return Ok(());
    }
    settled(&up.grpc, 1).await?;

    let refused = interpose(
        &up.grpc,
        &["export", "--follow", "--out", "-", "--status", "active"],
    )
    .await?;
    ensure!(!refused.ok, "--follow --status was accepted");
    assert!(refused.stderr.contains("status"), "{}", refused.stderr);

    let out = tempfile::tempdir()?;
    let mut live = LiveExport::start(&up.grpc, &out.path().join("follow.log"), &[])?;
    // The filters of a batch export apply: only the TLS server's port.
    let tls_port = tls.port().to_string();
    let mut filtered = LiveExport::start(
        &up.grpc,
        &out.path().join("filtered.log"),
        &["--dst-port", &tls_port],
    )?;
    let early = live
        .until("the earlier connection, closed", |s| {
            s.len() == 1 && s[0].fin == [true, true]
        })
        .await?;
    assert!(
        early[0].s2c.starts_with(b"HTTP/1.1 200 OK"),
        "{:?}",
        String::from_utf8_lossy(&early[0].s2c)
    );

    // Plain TCP, live: the bytes appear while the connection is still open, FIN once closed.
    let server = Server::bind().await?;
    let mut client = socks_connected(socks, server.addr).await?;
    let mut srv = server.accept().await?;
    client.write_all(b"live hello from the client").await?;
    read_n(&mut srv, 26).await?;
    srv.write_all(b"live answer from the server").await?;
    read_n(&mut client, 27).await?;
    let open = live
        .until("the live bytes of the open connection", |s| {
            s.len() == 2
                && s[1].c2s == b"live hello from the client"
                && s[1].s2c == b"live answer from the server"
        })
        .await?;
    assert_eq!(open[1].fin, [false, false], "FIN before the close");
    client.shutdown().await?;
    assert!(read_to_end(&mut srv).await?.is_empty());
    srv.shutdown().await?;
    assert!(read_to_end(&mut client).await?.is_empty());
    live.until("the FIN of the closed connection", |s| {
        s.len() == 2 && s[1].fin == [true, true]
    })
    .await?;

    // Intercepted TLS, live: the decrypted HTTP.
    if curl(&up, &format!("https://localhost:{}/tls", tls.port()))
        .await?
        .is_none()
    {
        return Ok(());
    }
    live.until("the decrypted TLS connection, closed", |s| {
        s.len() == 3
            && s[2].fin == [true, true]
            && s[2].s2c.windows(14).any(|w| w == b"hello from /tl")
    })
    .await?;

    let only_tls = filtered
        .until("the filtered export's TLS connection, closed", |s| {
            !s.is_empty() && s.iter().all(|s| s.fin == [true, true])
        })
        .await?;
    assert_eq!(
        only_tls.len(),
        1,
        "the filter let other connections through"
    );
    assert_eq!(only_tls[0].server.map(|a| a.port()), Some(tls.port()));

    let prefix = live.bytes();
    ensure!(
        live.interrupt().await?,
        "the live export did not exit 0 on SIGINT"
    );
    let file = out.path().join("live.pcapng");
    std::fs::write(&file, &prefix)?;
    let recorded = settled(&up.grpc, 3).await?;
    let cap = read_capture(&file)?;
    assert!(
        cap.names.iter().any(|n| n.contains("localhost")),
        "{:?}",
        cap.names
    );
    let streams = reassemble(&cap)?;
    assert_streams_match(&streams, &recorded)?;
    for (s, (c, _)) in streams.iter().zip(&recorded) {
        let comment = s.comment.as_deref().context("comment on the first frame")?;
        assert!(
            comment.contains(&format!("interpose connection {};", c.id)),
            "{comment}"
        );
    }
    if tshark().is_some() {
        tshark_agrees(&file, &streams).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_exits_0_when_its_reader_closes_the_pipe() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &[]).await?;
    let http = http_server(None).await?;
    let out = tempfile::tempdir()?;
    let (mut child, mut stdout) = LiveExport::spawn(&up.grpc, &out.path().join("follow.log"), &[])?;
    // The header comes at once, before any traffic; then the reader goes away.
    let header = tokio::task::spawn_blocking(move || {
        let mut magic = [0u8; 4];
        std::io::Read::read_exact(&mut stdout, &mut magic).map(|()| magic)
    });
    let magic = tokio::time::timeout(tests::WAIT, header).await???;
    assert_eq!(
        magic,
        [0x0a, 0x0d, 0x0d, 0x0a],
        "section header block first"
    );
    // The next write (this connection) finds the pipe closed.
    if curl(&up, &format!("http://localhost:{}/after", http.port()))
        .await?
        .is_none()
    {
        return Ok(());
    }
    let status = tests::eventually("the export to exit", || {
        let st = child.try_wait();
        async move { Ok(st?) }
    })
    .await?;
    let log = std::fs::read_to_string(out.path().join("follow.log"))?;
    assert!(status.success(), "exit {status}: {log}");
    Ok(())
}
