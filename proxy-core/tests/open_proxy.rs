//! The standalone binary refuses to be an open proxy: SOCKS beyond loopback needs
//! authentication or an explicit --open-proxy. (Having an integration test also makes
//! `cargo test` build this binary for the end-to-end tests in tests/.)

use std::process::Command;

#[test]
fn socks_beyond_loopback_without_auth_is_refused() {
    let dir = std::env::temp_dir().join(format!("proxy-open-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_proxy-core"))
        .args([
            "--socks",
            "0.0.0.0:0",
            "--registry",
            "http://127.0.0.1:1",
            "--data-dir",
        ])
        .arg(&dir)
        .env_remove("INTERPOSE_TOKEN")
        .output()
        .expect("running proxy-core");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open proxy"), "{err}");
}
