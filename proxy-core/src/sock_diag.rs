//! The sock_diag netlink socket: the inode of one TCP socket, by its exact address pair, from
//! the kernel (what `ss` uses), for telling which local process a client is ([`crate::process`]).
//!
//! The messages are built and parsed sans I/O in [`protocols::sock_diag`] (why sock_diag and
//! not `/proc/net/tcp` is said there); [`SockDiag`] is the thin socket shell around them.
//! Linux only: elsewhere [`SockDiag::open`] fails and the caller falls back to
//! `/proc/net/tcp`.

use std::{io, io::Read, net::SocketAddr, time::Duration};

use protocols::sock_diag::{Answer, parse_reply, request};
use socket2::{Domain, Protocol, Socket, Type};

const AF_NETLINK: i32 = 16;
const NETLINK_SOCK_DIAG: i32 = 4;

/// A sock_diag netlink socket.
pub struct SockDiag {
    socket: Socket,
    seq: u32,
}

impl SockDiag {
    /// Opens the netlink socket (fails where sock_diag does not exist).
    pub fn open() -> io::Result<Self> {
        let socket = Socket::new(
            Domain::from(AF_NETLINK),
            Type::DGRAM,
            Some(Protocol::from(NETLINK_SOCK_DIAG)),
        )?;
        // A reply is immediate; the timeout only guards against a kernel that never answers.
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Self { socket, seq: 0 })
    }

    /// The inode of the TCP socket with local address `local` and remote `remote`, if the
    /// kernel has it. Blocking (briefly).
    pub fn inode(&mut self, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
        self.seq = self.seq.wrapping_add(1);
        self.socket.send(&request(local, remote, self.seq))?;
        let mut buf = [0u8; 512];
        loop {
            let n = (&self.socket).read(&mut buf)?;
            match parse_reply(&buf[..n], self.seq)? {
                Answer::Inode(i) => return Ok(Some(i)),
                Answer::NotFound => return Ok(None),
                Answer::Stale => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's answer for a real socket is the inode `/proc` shows for it.
    #[test]
    fn finds_a_real_socket_and_not_a_closed_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (c_local, c_remote) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let mut diag = SockDiag::open().unwrap();
        let inode = diag
            .inode(c_local, c_remote)
            .unwrap()
            .expect("socket found");
        let fd_inode = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|t| {
                t.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            })
            .any(|i| i == inode);
        assert!(fd_inode, "inode {inode} is one of our sockets");
        let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(diag.inode(unused, c_remote).unwrap(), None);
    }
}
