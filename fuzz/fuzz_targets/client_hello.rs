//! TLS ClientHello detection on the first bytes of a stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| protocols::fuzzing::client_hello(data));
