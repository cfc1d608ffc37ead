//! HTTP CONNECT parsers: the request on `--http`, an upstream's answer, HTTP on the SOCKS port.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| protocols::fuzzing::http_connect(data));
