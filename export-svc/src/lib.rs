//! export-svc: the decrypted sessions as PCAP and pcapng, built from the registry's
//! connection records and proxy history.
//!
//! The framing is sans-I/O: [`wire`] writes Ethernet/IP/TCP/UDP headers, [`endpoints`]
//! picks a stream's addresses, [`session`] turns one connection into frames and
//! [`capture`] frames them as a capture file.

pub mod capture;
pub mod endpoints;
pub mod session;
pub mod wire;
