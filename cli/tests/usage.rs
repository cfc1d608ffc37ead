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
    // The names in the "Commands:" section, one per line, up to the blank line after it.
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        listed,
        ["up", "conns", "history", "ca", "help"],
        "subcommands in:\n{help}"
    );
}

#[test]
fn up_takes_every_proxy_flag() {
    let out = interpose(&["up", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--socks ",
        "--node ",
        "--history ",
        "--socks-user ",
        "--socks-pass ",
        "--open-proxy",
        "--queue-bound ",
        "--upstream-ca ",
        "--upstream-insecure",
        "--passthrough ",
        "--client-cert ",
        "--keylog ",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn up_refuses_an_open_proxy_and_names_the_flags_that_allow_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = interpose(&[
        "up",
        "--data-dir",
        &dir.path().to_string_lossy(),
        "--grpc",
        "127.0.0.1:0",
        "--socks",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve SOCKS on 0.0.0.0:0 without authentication")
            && err.contains("--socks-user/--socks-pass, pass --open-proxy"),
        "{err}"
    );
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
