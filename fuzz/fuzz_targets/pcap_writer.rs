//! The PCAP/pcapng writer: a connection of any shape, written and read back.
#![no_main]

libfuzzer_sys::fuzz_target!(|capture: protocols::fuzzing::Capture| {
    protocols::fuzzing::capture(&capture)
});
