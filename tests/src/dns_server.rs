//! A tiny DNS server on 127.0.0.1 UDP for the resolver tests: names under `fast.test` get
//! an A record 127.0.0.1 at once (and an empty answer for other types), names under
//! `slow.test` are not answered (a stalled name server) until the test calls
//! [`DnsServer::release`], anything else gets NXDOMAIN.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::net::UdpSocket;

/// A running test name server; stops when dropped.
pub struct DnsServer {
    /// Where it listens (UDP).
    pub addr: SocketAddr,
    /// The `slow.test` names it was asked for (and did not answer).
    stalled: Arc<Mutex<HashSet<String>>>,
    /// Tells the server to stop stalling.
    release: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Binds 127.0.0.1:0 and starts answering.
    pub async fn start() -> anyhow::Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = sock.local_addr()?;
        let stalled = Arc::new(Mutex::new(HashSet::new()));
        let seen = stalled.clone();
        let (release, mut released) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            // The stalled queries, answered (NXDOMAIN) on release.
            let mut held: Vec<(Vec<u8>, String, u16, SocketAddr)> = Vec::new();
            loop {
                let stalling = !*released.borrow();
                let (n, from) = tokio::select! {
                    r = sock.recv_from(&mut buf) => match r {
                        Ok(r) => r,
                        Err(_) => return,
                    },
                    r = released.changed(), if stalling => {
                        if r.is_err() {
                            return;
                        }
                        for (query, name, qtype, from) in held.drain(..) {
                            let _ = sock.send_to(&answer(&query, &name, qtype), from).await;
                        }
                        continue;
                    }
                };
                let Some((name, qtype, end)) = parse_query(&buf[..n]) else {
                    continue;
                };
                if stalling && name.ends_with("slow.test") {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name.clone());
                    held.push((buf[..end].to_vec(), name, qtype, from));
                    continue;
                }
                let out = answer(&buf[..end], &name, qtype);
                let _ = sock.send_to(&out, from).await;
            }
        });
        Ok(Self {
            addr,
            stalled,
            release,
            task,
        })
    }

    /// Stops stalling: every `slow.test` query asked so far, and every later one, gets
    /// NXDOMAIN.
    pub fn release(&self) {
        let _ = self.release.send(true);
    }

    /// How many distinct `slow.test` names it was asked for so far.
    pub fn stalled_names(&self) -> usize {
        self.stalled.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TYPE_A: u16 = 1;

/// The question of a query: its name (lower case, no trailing dot), type, and where the
/// question section ends.
fn parse_query(msg: &[u8]) -> Option<(String, u16, usize)> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = usize::from(*msg.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

/// The response to `query` (header and question, without any additional records):
/// A 127.0.0.1 for an A query of a `fast.test` name, no answer for its other types, and
/// NXDOMAIN for any other name.
fn answer(query: &[u8], name: &str, qtype: u16) -> Vec<u8> {
    let fast = name == "fast.test" || name.ends_with(".fast.test");
    let mut out = query.to_vec();
    let rd = query[2] & 0x01;
    out[2] = 0x84 | rd; // response, authoritative, recursion desired as asked
    out[3] = 0x80 | if fast { 0 } else { 3 }; // recursion available; NOERROR or NXDOMAIN
    let answers: u16 = u16::from(fast && qtype == TYPE_A);
    out[6..8].copy_from_slice(&answers.to_be_bytes());
    out[8..12].fill(0); // no authority or additional records
    if answers == 1 {
        out.extend_from_slice(&[0xc0, 12]); // the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes()); // class IN
        out.extend_from_slice(&60u32.to_be_bytes()); // TTL
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&[127, 0, 0, 1]);
    }
    out
}
