//! The contract crate (`proto`) carries no server stack: a client or a test that wants only
//! the messages gets the generated code and tonic's client, not the platform's TLS,
//! certificates, command line or process plumbing (that is `platform`). The sans-I/O
//! protocol crate (`protocols`) carries neither the server stack nor the contract nor a
//! runtime, and the fuzz targets (`fuzz/`, its own workspace) depend on it alone. Read from
//! cargo's own dependency resolution (and fuzz/Cargo.toml's text), so a dependency added by
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

/// What the sans-I/O protocol code must not pull in besides [`SERVER_STACK`]: the contract,
/// the runtime, gRPC and the raw sockets of the shells around it.
const NOT_SANS_IO: &[&str] = &["proto", "tokio", "tonic", "socket2"];

/// The packages in `package`'s normal (not build or dev) dependency closure, as resolved for
/// that package alone.
fn normal_closure(package: &str) -> BTreeSet<String> {
    closure_with(package, &[])
}

/// [`normal_closure`] with more `cargo tree` arguments (features).
fn closure_with(package: &str, more: &[&str]) -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(["-f", "{p}", "-p", package])
        .args(more)
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

#[test]
fn the_protocols_crate_depends_on_no_server_stack_no_contract_and_no_runtime() {
    // With and without the `fuzzing` feature the fuzz targets build it with.
    for features in [&[][..], &["--features", "fuzzing"]] {
        let closure = closure_with("protocols", features);
        for needed in ["protocols", "base64", "thiserror"] {
            assert!(
                closure.contains(needed),
                "{needed} missing from {closure:?}"
            );
        }
        let leaked: Vec<&str> = SERVER_STACK
            .iter()
            .chain(NOT_SANS_IO)
            .copied()
            .filter(|c| closure.contains(*c))
            .collect();
        assert!(
            leaked.is_empty(),
            "protocols {features:?} depends on {leaked:?}"
        );
    }
    // The same reading finds them where the shells are.
    let shell = normal_closure("proxy-core");
    for expected in ["protocols", "proto", "tokio", "socket2", "rustls"] {
        assert!(
            shell.contains(expected),
            "{expected} missing from {shell:?}"
        );
    }
}

/// The dependency names a Cargo manifest declares, read as text: the keys of `[dependencies]`
/// and of `[target.*.dependencies]`, and the `NAME` of `[dependencies.NAME]` tables (dev and
/// build dependencies are not the fuzzed code's).
fn declared_dependencies(manifest: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut keys_are_names = false;
    for line in manifest.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_end_matches(']');
            keys_are_names = header == "dependencies"
                || (header.starts_with("target.") && header.ends_with(".dependencies"));
            if let Some(name) = header
                .strip_prefix("dependencies.")
                .or_else(|| header.split_once(".dependencies.").map(|(_, n)| n))
            {
                names.insert(name.to_owned());
            }
        } else if keys_are_names
            && !line.starts_with('#')
            && let Some((key, _)) = line.split_once('=')
        {
            names.insert(key.trim().to_owned());
        }
    }
    names
}

#[test]
fn the_fuzz_targets_depend_on_the_protocols_crate_alone() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml"))
        .unwrap_or_else(|e| panic!("reading fuzz/Cargo.toml: {e}"));
    let deps = declared_dependencies(&manifest);
    assert_eq!(
        deps,
        BTreeSet::from(["libfuzzer-sys".to_owned(), "protocols".to_owned()]),
        "fuzz/Cargo.toml's dependencies"
    );
    let protocols = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("protocols"))
        .unwrap_or_default();
    assert!(
        protocols.contains(r#"path = "../protocols""#) && protocols.contains(r#""fuzzing""#),
        "fuzz/ uses the workspace's protocols crate with `fuzzing`: {protocols}"
    );
}

/// The manifest reading itself: every way of declaring a dependency is found, and what is not
/// a dependency is not.
#[test]
fn declared_dependencies_reads_every_form() {
    let manifest = r#"
[package]
name = "x"

[dependencies]
a = "1"
# b = "1"
c = { path = "../c", features = [
    "f",
] }

[dependencies.d]
version = "1"

[target.'cfg(unix)'.dependencies]
e = "1"

[dev-dependencies]
f = "1"
"#;
    let want = ["a", "c", "d", "e"].map(str::to_owned);
    assert_eq!(declared_dependencies(manifest), BTreeSet::from(want));
}
