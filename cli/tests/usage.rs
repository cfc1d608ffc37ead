//! The `interpose` binary's command line: usage errors are caught before any network I/O.
//! (Having an integration test also makes `cargo test` build this binary for the
//! end-to-end tests in tests/.)

use std::process::Command;

fn interpose(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_interpose"))
        .args(args)
        .env_remove("INTERPOSE_SERVER")
        .output()
        .expect("running interpose")
}

#[test]
fn help_lists_every_subcommand() {
    let out = interpose(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["up", "conns", "history", "ca"] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
}

#[test]
fn clear_needs_ids_or_all_but_not_both() {
    let none = interpose(&["conns", "clear"]);
    assert!(!none.status.success());
    let both = interpose(&["conns", "clear", "3", "--all"]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("--all"));
}

#[test]
fn bad_filter_values_name_the_choices() {
    let out = interpose(&["conns", "list", "--status", "sleeping"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("active") && err.contains("disconnected"),
        "{err}"
    );
}
