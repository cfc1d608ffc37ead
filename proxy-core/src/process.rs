//! Which local process owns a client socket (Linux `/proc`), for clients on the proxy's
//! own host.
//!
//! The client's socket has as its *local* address the address the proxy sees as the peer.
//! [`parse_tcp_line`] reads one line of `/proc/net/tcp` or `/proc/net/tcp6` (pure, tested);
//! [`Scanner::lookup`] finds the socket inodes of the wanted addresses (by sock_diag, else
//! from `/proc/net/tcp`), then looks for `socket:[INODE]` links in `/proc/PID/fd` (recent
//! client processes first, then every process) and reads `/proc/PID/comm`. A [`Resolver`] task batches requests
//! so that one scan serves every connection accepted meanwhile, runs the scan on the
//! blocking pool, at most every [`MIN_SCAN_INTERVAL`] and idle at least four times as long
//! as the last scan took (so lookups never take more than a fifth of a core), and reports each hit as a
//! `ConnectionUpdate`. Lookups are best effort: a client that already closed, a process of
//! another user (without privileges), or a full request queue leaves `client_process` unset.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use proto::{common::ClientProcess, registry::ConnectionUpdate};
use tokio::sync::mpsc;

use crate::{report::Reporter, sock_diag::SockDiag};

/// Lookups waiting beyond this many are dropped (`client_process` stays unset).
pub const QUEUE: usize = 4096;
/// Shortest time between two scans of `/proc`.
pub const MIN_SCAN_INTERVAL: Duration = Duration::from_millis(20);

/// One socket of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEntry {
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
    /// Socket inode (0 for sockets no process owns, e.g. TIME_WAIT).
    pub inode: u64,
}

/// Parses `ADDR:PORT` in the kernel's hex notation: the address is the in-memory
/// representation printed as 32-bit words in host byte order.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses one line of `/proc/net/tcp` or `/proc/net/tcp6`; `None` for the header and for
/// anything malformed.
pub fn parse_tcp_line(line: &str) -> Option<TcpEntry> {
    let mut f = line.split_whitespace();
    let _sl = f.next()?.strip_suffix(':')?;
    let local = parse_hex_addr(f.next()?)?;
    let remote = parse_hex_addr(f.next()?)?;
    // st, tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, inode
    let inode = f.nth(6)?.parse().ok()?;
    Some(TcpEntry {
        local,
        remote,
        inode,
    })
}

/// Maps IPv4-mapped IPv6 addresses to plain IPv4, so addresses compare alike.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// How many recent client processes are looked at before all of `/proc`.
const RECENT: usize = 8;

/// Finds client processes. Keeps a sock_diag socket (see [`crate::sock_diag`]) and the
/// processes that owned recent clients: most connections come from a few applications, so
/// their descriptors are looked at first and the scan of every process is usually skipped.
pub struct Scanner {
    diag: Option<SockDiag>,
    recent: VecDeque<u32>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    /// A scanner; without sock_diag (not Linux, or refused) it reads `/proc/net/tcp*`.
    pub fn new() -> Self {
        let diag = match SockDiag::open() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!("sock_diag unavailable ({e}); reading /proc/net/tcp instead");
                None
            }
        };
        Self {
            diag,
            recent: VecDeque::new(),
        }
    }

    /// Finds the owning process of each client socket: `wanted` maps a key to (client
    /// address, proxy address) as the proxy saw them. Blocking: run it on the blocking pool.
    pub fn lookup<K: Clone + Eq + std::hash::Hash>(
        &mut self,
        wanted: &[(K, SocketAddr, SocketAddr)],
    ) -> HashMap<K, ClientProcess> {
        let mut by_inode = self.inodes(wanted);
        let mut found = HashMap::new();
        if by_inode.is_empty() {
            return found;
        }
        let mut hits = Vec::new();
        for &pid in &self.recent {
            if scan_pid(pid, &mut by_inode, &mut found) {
                hits.push(pid);
            }
            if by_inode.is_empty() {
                break;
            }
        }
        let all = if by_inode.is_empty() {
            None
        } else {
            std::fs::read_dir("/proc").ok()
        };
        for p in all.into_iter().flatten().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if !self.recent.contains(&pid) && scan_pid(pid, &mut by_inode, &mut found) {
                hits.push(pid);
            }
            if by_inode.is_empty() {
                break;
            }
        }
        for pid in hits {
            self.recent.retain(|p| *p != pid);
            self.recent.push_front(pid);
            self.recent.truncate(RECENT);
        }
        found
    }

    /// The socket inode of each wanted client socket still open.
    fn inodes<K: Clone>(&mut self, wanted: &[(K, SocketAddr, SocketAddr)]) -> HashMap<u64, Vec<K>> {
        let mut by_inode: HashMap<u64, Vec<K>> = HashMap::new();
        let mut rest = Vec::new();
        for (k, client, proxy) in wanted {
            let Some(diag) = self.diag.as_mut() else {
                rest.push((k.clone(), *client, *proxy));
                continue;
            };
            let (c, p) = (canonical(*client), canonical(*proxy));
            let mut answer = diag.inode(c, p);
            if matches!(answer, Ok(None)) && c != *client {
                // A client with an IPv6 socket that reached us over a mapped address.
                answer = diag.inode(*client, *proxy);
            }
            match answer {
                Ok(Some(inode)) => by_inode.entry(inode).or_default().push(k.clone()),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!("sock_diag failed ({e}); reading /proc/net/tcp instead");
                    self.diag = None;
                    rest.push((k.clone(), *client, *proxy));
                }
            }
        }
        if !rest.is_empty() {
            for (inode, keys) in inodes_from_proc_net(&rest) {
                by_inode.entry(inode).or_default().extend(keys);
            }
        }
        by_inode
    }
}

/// The socket inodes of the wanted client sockets, from `/proc/net/tcp{,6}`: slow with many
/// sockets (the kernel prints its whole table), the fallback when sock_diag is unavailable.
fn inodes_from_proc_net<K: Clone>(wanted: &[(K, SocketAddr, SocketAddr)]) -> HashMap<u64, Vec<K>> {
    let mut by_inode: HashMap<u64, Vec<K>> = HashMap::new();
    let mut want: HashMap<(SocketAddr, SocketAddr), K> = wanted
        .iter()
        .map(|(k, client, proxy)| ((canonical(*client), canonical(*proxy)), k.clone()))
        .collect();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // Line by line through a small buffer: with tens of thousands of sockets the table
        // is megabytes, which should not become resident memory of the proxy.
        let Ok(f) = std::fs::File::open(table) else {
            continue;
        };
        let mut r = std::io::BufReader::with_capacity(32 * 1024, f);
        let mut line = String::with_capacity(256);
        loop {
            line.clear();
            match std::io::BufRead::read_line(&mut r, &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let Some(e) = parse_tcp_line(&line) else {
                continue;
            };
            if e.inode == 0 {
                continue;
            }
            if let Some(k) = want.remove(&(canonical(e.local), canonical(e.remote))) {
                by_inode.entry(e.inode).or_default().push(k);
            }
            if want.is_empty() {
                return by_inode;
            }
        }
    }
    by_inode
}

/// Looks through the descriptors of process `pid` for the wanted socket inodes, moving each
/// hit from `by_inode` to `found`. Returns whether it had any.
fn scan_pid<K>(
    pid: u32,
    by_inode: &mut HashMap<u64, Vec<K>>,
    found: &mut HashMap<K, ClientProcess>,
) -> bool
where
    K: Eq + std::hash::Hash,
{
    let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
        return false;
    };
    let mut hit = false;
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        if let Some(keys) = by_inode.remove(&inode) {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let p = ClientProcess {
                pid,
                name: comm.trim_end().to_string(),
            };
            for k in keys {
                found.insert(k, p.clone());
            }
            hit = true;
            if by_inode.is_empty() {
                break;
            }
        }
    }
    hit
}

/// Handle for requesting lookups; cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    tx: mpsc::Sender<(u64, SocketAddr, SocketAddr)>,
}

impl Resolver {
    /// Starts the lookup task; hits are reported through `reporter`.
    pub fn start(reporter: Reporter) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, reporter));
        Self { tx }
    }

    /// Asks for the process behind connection `id` (client `client`, accepted on `proxy`).
    /// Only loopback clients can be local; others are ignored.
    pub fn request(&self, id: u64, client: SocketAddr, proxy: SocketAddr) {
        if canonical(client).ip().is_loopback() {
            let _ = self.tx.try_send((id, client, proxy));
        }
    }
}

async fn run(mut rx: mpsc::Receiver<(u64, SocketAddr, SocketAddr)>, reporter: Reporter) {
    let mut batch = Vec::new();
    let mut scanner = Some(Scanner::new());
    loop {
        if rx.recv_many(&mut batch, QUEUE).await == 0 {
            return;
        }
        let wanted = std::mem::take(&mut batch);
        let started = std::time::Instant::now();
        let mut s = scanner.take().unwrap_or_default();
        let Ok((found, s)) = tokio::task::spawn_blocking(move || {
            let found = s.lookup(&wanted);
            (found, s)
        })
        .await
        else {
            continue;
        };
        scanner = Some(s);
        let took = started.elapsed();
        for (id, p) in found {
            reporter.updated(ConnectionUpdate {
                id,
                client_process: Some(p),
                ..Default::default()
            });
        }
        // Scans cost more with many sockets (TIME_WAIT entries fill /proc/net/tcp under a
        // high connection rate): keep them to at most a fifth of one core.
        tokio::time::sleep(MIN_SCAN_INTERVAL.max(took * 4)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_lines() {
        let line = "   1: 0100007F:A2C4 0100007F:1F90 01 00000000:00000000 00:00000000 \
                    00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        let e = parse_tcp_line(line).unwrap();
        assert_eq!(e.local, "127.0.0.1:41668".parse().unwrap());
        assert_eq!(e.remote, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(e.inode, 123456);
        assert_eq!(
            parse_tcp_line(
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
            ),
            None
        );
        assert_eq!(parse_tcp_line(""), None);
        assert_eq!(parse_tcp_line("0: zz:1 00:00"), None);
    }

    #[test]
    fn parses_ipv6_lines() {
        let line = "   0: 00000000000000000000000001000000:0050 0000000000000000FFFF00000100007F:9C40 \
                    01 00000000:00000000 00:00000000 00000000  1000        0 42 1 0 20 4 30 10 -1";
        let e = parse_tcp_line(line).unwrap();
        assert_eq!(e.local, "[::1]:80".parse().unwrap());
        assert_eq!(e.remote, "[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(canonical(e.remote), "127.0.0.1:40000".parse().unwrap());
        assert_eq!(e.inode, 42);
    }

    #[test]
    fn finds_our_own_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        let wanted = [(1u8, peer, l.local_addr().unwrap())];
        let mut s = Scanner::new();
        assert!(s.diag.is_some(), "sock_diag works here");
        let p = s
            .lookup(&wanted)
            .get(&1)
            .cloned()
            .expect("own process found");
        assert_eq!(p.pid, std::process::id());
        // Now a recent process: found again, first place looked at.
        assert_eq!(s.recent.front(), Some(&std::process::id()));
        assert_eq!(s.lookup(&wanted).get(&1), Some(&p));
        // The /proc/net/tcp fallback agrees.
        let mut fallback = Scanner {
            diag: None,
            recent: VecDeque::new(),
        };
        assert_eq!(fallback.lookup(&wanted).get(&1), Some(&p));
        // A closed client is not found.
        let peer_closed = (2u8, "127.0.0.1:1".parse().unwrap(), l.local_addr().unwrap());
        assert!(s.lookup(&[peer_closed]).is_empty());
        drop(c);
    }
}
