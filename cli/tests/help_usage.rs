//! Every subcommand's `--help` with the client options set from the environment, as a user
//! who exported INTERPOSE_SERVER and INTERPOSE_TOKEN_FILE has them: the usage line shows
//! only what the command line must give, never an option the environment provides as if it
//! were required; and `up --help` lists no client-only option.

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation fails the test"
)]

use std::process::Command;

/// The client options' environment variables, each set to a plausible value.
const ENV: &[(&str, &str)] = &[
    ("INTERPOSE_SERVER", "http://127.0.0.1:1"),
    ("INTERPOSE_TOKEN", "t0ken"),
    ("INTERPOSE_TOKEN_FILE", "/nonexistent/token"),
    ("INTERPOSE_DATA_DIR", "/nonexistent/data"),
    ("INTERPOSE_CLIENT_CERT", "/nonexistent/cert.pem"),
    ("INTERPOSE_CLIENT_KEY", "/nonexistent/key.pem"),
    ("INTERPOSE_CA_CERT", "/nonexistent/ca.pem"),
];

/// The options those variables provide.
const FROM_ENV: &[&str] = &[
    "--server",
    "--token ",
    "--token-file",
    "--data-dir",
    "--client-cert",
    "--client-key",
    "--ca-cert",
];

fn interpose(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_interpose"))
        .args(args)
        .envs(ENV.iter().copied())
        .output()
        .expect("running interpose")
}

/// The names in a help text's "Commands:" section.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect()
}

/// The usage line(s) of a help text: from `Usage:` to the first blank line.
fn usage(help: &str) -> String {
    help.lines()
        .skip_while(|l| !l.starts_with("Usage:"))
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn usage_lines_never_show_options_the_environment_provides() {
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut checked = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = interpose(&args);
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        let line = usage(&help);
        assert!(line.starts_with("Usage: interpose"), "{args:?}:\n{help}");
        for opt in FROM_ENV {
            assert!(!line.contains(opt), "{args:?} shows {opt} in\n{line}");
        }
        checked += 1;
        for sub in subcommands(&help) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
    }
    // interpose, its 9 subcommands and theirs.
    assert!(checked > 30, "only {checked} help texts");
}

#[test]
fn usage_errors_do_not_show_environment_options_either() {
    // A missing required option: clap prints the usage under the error.
    for args in [
        &["export"][..],
        &["conns", "copy"],
        &["history", "show", "1"],
    ] {
        let out = interpose(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = usage(&err);
        assert!(line.starts_with("Usage: interpose"), "{args:?}: {err}");
        for opt in FROM_ENV {
            assert!(!line.contains(opt), "{args:?} shows {opt} in\n{err}");
        }
    }
}

#[test]
fn up_help_lists_no_client_only_option_under_server() {
    let out = interpose(&["up", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--server",
        "--client-key",
        "--ca-cert",
        "INTERPOSE_CLIENT_KEY",
    ] {
        assert!(!help.contains(opt), "{opt} in up --help:\n{help}");
    }
    assert!(!help.contains("\nServer:\n"), "{help}");
}

#[test]
fn connection_ids_and_ports_of_0_are_refused_before_any_network_io() {
    for (args, says) in [
        (&["history", "--conn", "0"][..], "connection IDs start at 1"),
        (&["history", "show", "0", "1"], "connection IDs start at 1"),
        (
            &["intercept", "on", "--conn", "0"],
            "connection IDs start at 1",
        ),
        (&["intercept", "on", "--port", "0"], "--port"),
    ] {
        let out = interpose(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
