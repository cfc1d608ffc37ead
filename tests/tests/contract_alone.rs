//! The contract crate (`proto`) carries no server stack: a client, a fuzz target or a test
//! that wants only the messages gets the generated code and tonic's client, not the
//! platform's TLS, certificates, command line or process plumbing (that is `platform`).
//! Read from cargo's own dependency resolution, so a dependency added to `proto` by
//! mistake, directly or through another crate, fails here.

use std::{collections::BTreeSet, path::Path, process::Command};

/// Crates only a server process needs: if `proto` pulls one in, the split has leaked.
const SERVER_STACK: &[&str] = &[
    "platform",
    "rustls",
    "tokio-rustls",
    "rcgen",
    "clap",
    "rustix",
    "tracing-subscriber",
    "tonic-health",
    "tonic-reflection",
    "subtle",
    "x509-parser",
];

/// The packages in `package`'s normal (not build or dev) dependency closure, as resolved for
/// that package alone.
fn normal_closure(package: &str) -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(["-f", "{p}", "-p", package])
        .output()
        .unwrap_or_else(|e| panic!("running cargo tree: {e}"));
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_contract_crate_depends_on_no_server_stack() {
    let closure = normal_closure("proto");
    // The reading itself works: the contract's own crates are there.
    for needed in ["proto", "tonic", "prost", "prost-types"] {
        assert!(
            closure.contains(needed),
            "{needed} missing from {closure:?}"
        );
    }
    let leaked: Vec<&str> = SERVER_STACK
        .iter()
        .copied()
        .filter(|c| closure.contains(*c))
        .collect();
    assert!(leaked.is_empty(), "proto depends on {leaked:?}");
}

#[test]
fn the_platform_crate_is_where_the_server_stack_is() {
    // The same reading over the platform finds what the contract must not have, so the
    // test above cannot pass merely because the reading found nothing.
    let closure = normal_closure("platform");
    for expected in ["proto", "rustls", "rcgen", "clap", "tonic-health"] {
        assert!(
            closure.contains(expected),
            "{expected} missing from {closure:?}"
        );
    }
}
