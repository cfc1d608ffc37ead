//! TLS ClientHello detection on the first bytes of a stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_core::fuzzing::client_hello(data));
