//! protocols: the sans-I/O protocol code of Interpose. Every module is pure functions (and
//! small state machines) over byte buffers: the bytes received so far go in, a message, "need
//! more" or a typed error comes out, and what to send is appended to a `Vec<u8>`. Nothing here
//! opens a socket, awaits, spawns, reads a clock or logs, so every parser and writer is tested
//! and fuzzed directly, on any bytes, with no runtime.
//!
//! The model is mitmproxy's protocol layers (`mitmproxy/proxy/layers`): the protocol logic is
//! written once against buffers and events, and the I/O is a thin shell around it. Here the
//! shells are proxy-core's `handshake`, `http_ingress`, `chain::dial`, `tls::splice` and
//! `process` (the netlink socket), and export-svc's `job` and `live`, which page records
//! from the registry into [`frames`] and [`capture`] and stream the result.
//!
//! Modules:
//! - [`socks5`]: the SOCKS5 wire format (RFC 1928, RFC 1929), client and server side, and
//!   the UDP ASSOCIATE header.
//! - [`http_connect`]: HTTP CONNECT requests and answers, and HTTP recognised on the SOCKS
//!   port.
//! - [`client_hello`]: detection of a TLS ClientHello at the start of a stream.
//! - [`sock_diag`]: the kernel's sock_diag netlink request and reply (which socket is whose).
//! - [`wire`]: Ethernet, IPv4, IPv6, TCP and UDP headers with their checksums;
//!   [`frames`]: one connection as synthetic frames; [`capture`]: PCAP and pcapng files.
//! - `fuzzing` (tests and the `fuzzing` feature): the properties the fuzz targets in `fuzz/`
//!   check, one function per target, which `cargo test` also runs over the checked-in seeds
//!   (`fuzz_corpus`) and random inputs.
//!
//! Its normal dependencies are std, `base64` and `thiserror` (and, with `fuzzing`,
//! `arbitrary` and `pcap-file`): no tokio, no gRPC, no TLS stack. A test in
//! `tests/tests/contract_alone.rs` holds it to that, and `fuzz/` depends on this crate alone.

pub mod capture;
pub mod client_hello;
pub mod frames;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_corpus;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod http_connect;
pub mod sock_diag;
pub mod socks5;
pub mod wire;
