//! Embeds the built page (`ui/dist/`, committed) into the library: generates one
//! `include_bytes!` entry per file, so `cargo build` alone makes a binary that serves it. The
//! page is built by `npm ci && npm run build` in `ui/` (CI checks the committed build is
//! current); this script never runs npm.

#![expect(
    clippy::expect_used,
    reason = "a build script fails the build by panicking with its message"
)]

use std::{
    env, fs,
    path::{Path, PathBuf},
};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dist = manifest.join("ui").join("dist");
    // A folder here makes cargo rerun this script when any file under it changes.
    println!("cargo:rerun-if-changed={}", dist.display());
    if !dist.join("index.html").is_file() {
        panic!(
            "{} is missing: build the page with `npm ci && npm run build` in web/ui",
            dist.join("index.html").display()
        );
    }
    let mut files = Vec::new();
    collect(&dist, &dist, &mut files);
    files.sort();
    let mut out = String::from("/// Every file of `ui/dist/`: its URL path and its bytes.\n");
    out.push_str("pub(crate) static FILES: &[(&str, &[u8])] = &[\n");
    for (url, path) in &files {
        out.push_str(&format!(
            "    ({url:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    out.push_str("];\n");
    let dest = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("assets.rs");
    fs::write(&dest, out).expect("writing assets.rs");
}

/// Adds every file under `dir` as (`/relative/path`, absolute path).
fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, files);
        } else if path.is_file() {
            let rel = path.strip_prefix(root).expect("under the root");
            let url = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            files.push((format!("/{url}"), path));
        }
    }
}
