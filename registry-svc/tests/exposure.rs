//! The standalone binary refuses to expose the management API beyond loopback without a
//! token (`--no-auth`), before touching its data directory. (Having an integration test also makes
//! `cargo test` build this binary for the end-to-end tests in tests/.)

use std::process::Command;

#[test]
fn listening_beyond_loopback_needs_a_token() {
    let dir = std::env::temp_dir().join(format!("registry-exposure-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_registry-svc"))
        .args(["--listen", "0.0.0.0:0", "--no-auth", "--data-dir"])
        .arg(&dir)
        .env_remove("INTERPOSE_TOKEN")
        .output()
        .expect("running registry-svc");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without a token"), "{err}");
    assert!(!dir.exists(), "nothing is created before the check");
}
