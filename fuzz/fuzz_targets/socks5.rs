//! SOCKS5 parsers: greeting, RFC 1929 credentials, request, reply, UDP header.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| protocols::fuzzing::socks5(data));
