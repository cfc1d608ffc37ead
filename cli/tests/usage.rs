//! The `interpose` binary's command line: usage errors are caught before any network I/O.
//! (Having an integration test also makes `cargo test` build this binary for the
//! end-to-end tests in tests/.)

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation fails the test"
)]

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
        [
            "up",
            "conns",
            "history",
            "export",
            "intercept",
            "held",
            "replay",
            "ca",
            "web",
            "completions",
            "man",
            "help"
        ],
        "subcommands in:\n{help}"
    );
}

#[test]
fn up_takes_every_proxy_flag() {
    // Parsed, not grepped: clap reads the arguments in order, so `up FLAG [VALUE] --help`
    // succeeds only when `up` knows FLAG and it takes a value exactly when one is given.
    let unknown = interpose(&["up", "--no-such-flag", "--help"]);
    assert!(!unknown.status.success(), "the check can fail");
    for flag in [
        &["--socks", "127.0.0.1:0"][..],
        &["--node", "n"],
        &["--history", "off"],
        &["--socks-user", "u"],
        &["--socks-pass", "p"],
        &["--open-proxy"],
        &["--queue-bound", "10"],
        &["--upstream-ca", "/ca.pem"],
        &["--upstream-insecure"],
        &["--passthrough", "example.com"],
        &["--client-cert", "example.com=/c.pem,/k.pem"],
        &["--keylog", "/keys.log"],
    ] {
        let args: Vec<&str> = ["up"]
            .iter()
            .chain(flag)
            .chain(&["--help"])
            .copied()
            .collect();
        let out = interpose(&args);
        assert!(
            out.status.success(),
            "{flag:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

#[test]
fn server_without_a_scheme_means_http_with_a_note() {
    let out = interpose(&["conns", "list", "--server", "127.0.0.1:1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert_eq!(
        lines[0],
        "interpose: note: --server \"127.0.0.1:1\" has no scheme; using http://127.0.0.1:1"
    );
    assert!(
        lines[1].starts_with("interpose: cannot reach the Interpose server at http://127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn server_schemes_other_than_http_and_https_are_refused_by_name_and_https_needs_a_ca() {
    for (url, says) in [
        (
            "https://127.0.0.1:1",
            "no management CA certificate is known",
        ),
        ("ftp://127.0.0.1:1", "unsupported scheme ftp://"),
    ] {
        let out = interpose(&["conns", "list", "--server", url]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{url}: {err}");
    }
}

#[test]
fn a_port_that_does_not_speak_grpc_is_named_as_such() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let _ = s.read(&mut [0u8; 1024]);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let out = interpose(&["conns", "list", "--server", &format!("http://{addr}")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("is --server an Interpose gRPC address?"),
        "{err}"
    );
}

#[test]
fn completions_are_scripts_the_shell_accepts() {
    let out = interpose(&["completions", "bash"]);
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("conns") && script.contains("--status"),
        "{script}"
    );
    let dir = std::env::temp_dir().join(format!("interpose-completion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("interpose.bash");
    std::fs::write(&file, &out.stdout).expect("write script");
    let check = Command::new("bash")
        .arg("-n")
        .arg(&file)
        .output()
        .expect("bash -n");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn subcommands_that_talk_to_no_server_neither_list_nor_take_the_server_options() {
    let help = interpose(&["up", "--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(!text.contains("--server"), "{text}");
    assert!(
        text.contains("--grpc") && text.contains("--token-file"),
        "{text}"
    );
    for args in [
        &["up", "--server", "http://127.0.0.1:1"][..],
        &["--server", "http://127.0.0.1:1", "up"],
        &["completions", "bash", "--token", "t"],
        &["man", "--server", "http://127.0.0.1:1"],
    ] {
        let out = interpose(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is for the client subcommands;") && err.contains("talks to no server"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    for args in [&["completions", "bash"][..], &["man"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_interpose"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn interpose");
        // Close the pipe before reading a byte, as `| head -0` would.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("interpose ran");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn man_page_documents_the_subcommands() {
    let out = interpose(&["man"]);
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH interpose 1"), "{page}");
    assert!(page.contains("conns") && page.contains("history"), "{page}");
}

#[test]
fn client_help_groups_the_server_options_and_hides_unset_env_values() {
    let out = interpose(&["conns", "list", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let (own, server) = help.split_once("\nServer:\n").expect("a Server: section");
    assert!(
        !own.contains("--server") && !own.contains("--token"),
        "{help}"
    );
    assert!(
        server.contains("--server") && server.contains("--token"),
        "{help}"
    );
    assert!(!help.contains("INTERPOSE_SERVER="), "{help}");
}
