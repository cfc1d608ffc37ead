//! Which local process owns a client socket (Linux `/proc`), for clients on the proxy's
//! own host.
//!
//! The client's socket has as its *local* address the address the proxy sees as the peer.
//! [`parse_tcp_line`] reads one line of `/proc/net/tcp` or `/proc/net/tcp6` (pure, tested);
//! [`lookup`] finds the socket inodes of the wanted addresses, then scans `/proc/*/fd` for
//! `socket:[INODE]` links and reads `/proc/PID/comm`. A [`Resolver`] task batches requests
//! so that one scan serves every connection accepted meanwhile, runs the scan on the
//! blocking pool, at most every [`MIN_SCAN_INTERVAL`] and idle at least four times as long
//! as the last scan took (so lookups never take more than a fifth of a core), and reports each hit as a
//! `ConnectionUpdate`. Lookups are best effort: a client that already closed, a process of
//! another user (without privileges), or a full request queue leaves `client_process` unset.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use proto::{common::ClientProcess, registry::ConnectionUpdate};
use tokio::sync::mpsc;

use crate::report::Reporter;

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

/// Maps IPv4-mapped IPv6 addresses to plain IPv4, so both tables compare alike.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Finds the owning process of each client socket: `wanted` maps a key to (client address,
/// proxy address) as the proxy saw them. Blocking: run it on the blocking pool.
pub fn lookup<K: Clone + Eq + std::hash::Hash>(
    wanted: &[(K, SocketAddr, SocketAddr)],
) -> HashMap<K, ClientProcess> {
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
                break;
            }
        }
    }
    let mut found = HashMap::new();
    if by_inode.is_empty() {
        return found;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
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
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                let proc_ = ClientProcess {
                    pid,
                    name: comm.trim_end().to_string(),
                };
                for k in keys {
                    found.insert(k, proc_.clone());
                }
            }
        }
        if by_inode.is_empty() {
            break;
        }
    }
    found
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
    loop {
        if rx.recv_many(&mut batch, QUEUE).await == 0 {
            return;
        }
        let wanted = std::mem::take(&mut batch);
        let started = std::time::Instant::now();
        let Ok(found) = tokio::task::spawn_blocking(move || lookup(&wanted)).await else {
            continue;
        };
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
        let found = lookup(&[(1u8, peer, l.local_addr().unwrap())]);
        let p = found.get(&1).expect("own process found");
        assert_eq!(p.pid, std::process::id());
        drop(c);
    }
}
