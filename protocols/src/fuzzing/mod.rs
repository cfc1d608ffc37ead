//! The properties the fuzz targets in `fuzz/` check, one function per target, over any input.
//!
//! Each target (`cargo +nightly fuzz run socks5`, ...) is one line around one of these
//! functions, so on stable the same checks run in `cargo test`: over the checked-in seed
//! corpus (`fuzz/corpus/TARGET/`, read by [`crate::fuzz_corpus`]) and over proptest's random
//! inputs. Each function panics when a property fails; none of them does I/O.
//!
//! - [`parsers`]: targets `socks5`, `http_connect`, `client_hello` and `sock_diag`, over bytes.
//! - [`pcap_writer`]: target `pcap_writer`, over a [`Capture`] the fuzzer makes up.

pub mod parsers;
pub mod pcap_writer;

pub use parsers::{client_hello, http_connect, sock_diag, socks5};
pub use pcap_writer::{Capture, capture, capture_bytes};
