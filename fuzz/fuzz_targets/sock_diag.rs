//! Replies of the kernel's sock_diag netlink interface (client process lookup).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| protocols::fuzzing::sock_diag(data));
