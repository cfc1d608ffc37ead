//! The `interpose` command: `up` runs every service in one process; every other subcommand
//! is a gRPC client of the same API any other language would use.

pub mod ca;
pub mod client;
pub mod columns;
pub mod completions;
pub mod conns;
pub mod export;
pub mod held;
pub mod hexdump;
pub mod history;
pub mod history_budget;
pub mod history_purge;
pub mod intercept;
pub mod output;
pub mod replay;
pub mod table;
pub mod up;
pub mod watch;
pub mod web;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// `println!` that returns from the enclosing function with the write error instead of
/// panicking: a reader that closed the pipe (`| head`) ends the command quietly (see
/// [`is_closed_stdout`]).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// Where client subcommands find the server, and how they authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// gRPC URL of the Interpose server. Default: the URL `interpose up` recorded in the data
    /// directory (--data-dir), else http://127.0.0.1:50051.
    #[arg(
        long,
        global = true,
        env = "INTERPOSE_SERVER",
        hide_env_values = true,
        help_heading = "Server"
    )]
    pub server: Option<String>,
    /// The data directory of the `interpose up` to talk to: its recorded server URL, token
    /// and client certificate are used. Default: the user's data home, e.g.
    /// ~/.local/share/interpose.
    #[arg(
        long,
        global = true,
        env = "INTERPOSE_DATA_DIR",
        value_name = "DIR",
        help_heading = "Server"
    )]
    pub data_dir: Option<std::path::PathBuf>,
    /// Bearer token for the server. Default: the token file of the data directory
    /// (--data-dir), sent only to the default server or to the URL `interpose up` recorded
    /// there.
    #[arg(
        long,
        global = true,
        env = "INTERPOSE_TOKEN",
        hide_env_values = true,
        help_heading = "Server"
    )]
    pub token: Option<String>,
    /// Read the bearer token from this file (e.g. the `token=` path of `up`'s ready line).
    #[arg(
        long,
        global = true,
        env = "INTERPOSE_TOKEN_FILE",
        help_heading = "Server"
    )]
    pub token_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for an https:// server started with --grpc-tls, from
    /// `interpose ca issue-client`. Default: the data directory's mtls/client-cert.pem, for
    /// the server `interpose up` recorded there.
    #[arg(
        long,
        global = true,
        env = "INTERPOSE_CLIENT_CERT",
        value_name = "FILE",
        help_heading = "Server"
    )]
    pub client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        env = "INTERPOSE_CLIENT_KEY",
        value_name = "FILE",
        help_heading = "Server"
    )]
    pub client_key: Option<std::path::PathBuf>,
    /// The management CA certificate an https:// server's certificate must come from (its
    /// DATA_DIR/mtls/ca-cert.pem, also written by `interpose ca issue-client`).
    #[arg(
        long,
        global = true,
        env = "INTERPOSE_CA_CERT",
        value_name = "FILE",
        help_heading = "Server"
    )]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// The client-only options, caught on the subcommands that talk to no server (`completions`,
/// `man`): clap does not propagate a global option into a subcommand that has its own, so
/// their help does not list them, and [`parse`] refuses them there with a sentence.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NotAClient {
    #[arg(long = "server", hide = true)]
    pub server: Option<String>,
    #[arg(long = "token", hide = true)]
    pub token: Option<String>,
    #[arg(long = "token-file", hide = true)]
    pub token_file: Option<std::path::PathBuf>,
    #[arg(long = "data-dir", hide = true)]
    pub data_dir: Option<std::path::PathBuf>,
}

/// Interpose: a TLS-intercepting SOCKS5 proxy for any TCP protocol.
#[derive(Debug, Parser)]
#[command(name = "interpose", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per run: the size of `up`'s options does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run every service in one process on one loopback gRPC port.
    Up(Box<up::UpArgs>),
    /// Connection records: list, watch, clear, copy, stats.
    #[command(subcommand)]
    Conns(conns::ConnsCommand),
    /// Search the proxy history (every packet relayed).
    ///
    /// Columns (--columns): conn, seq, dir, time, len, data (the default set), target. A packet
    /// forwarded with other bytes or dropped has a second line with the bytes received.
    History(history::HistoryArgs),
    /// The decrypted sessions as a PCAP or pcapng file for Wireshark.
    Export(export::ExportArgs),
    /// Hold packets for a verdict: on (with filters), off, status, replace rules.
    #[command(subcommand)]
    Intercept(intercept::InterceptCommand),
    /// Held packets: list, watch, show, forward, drop, edit.
    #[command(subcommand)]
    Held(held::HeldCommand),
    /// Send a recorded connection's client packets again (edits, pacing, load) and compare
    /// the server's answers with the original's.
    Replay(replay::ReplayArgs),
    /// The CA certificate that intercepted TLS connections chain to.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Serve the web view for services that run apart (a lab): the page `up` serves.
    Web(web::WebCmdArgs),
    /// A shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(completions::CompletionsArgs),
    /// The man page (roff) on stdout, or every page into a folder.
    Man(completions::ManArgs),
}

/// Parses the command line (exiting with clap's usage error on a bad one). A client option
/// given on the command line to a subcommand that talks to no server is such an error, not
/// silently ignored; from the environment it is ignored.
pub fn parse() -> Cli {
    let mut cmd = Cli::command();
    let matches = cmd
        .try_get_matches_from_mut(std::env::args_os())
        .unwrap_or_else(|e| usage_error(&Cli::command(), e));
    if let Some((name, sub)) = matches.subcommand() {
        let caught: &[&str] = match name {
            // (`up --client-cert` is its own: for upstream TLS servers.)
            "up" => &["server", "client_key", "ca_cert"],
            "completions" | "man" => &["server", "token", "token_file", "data_dir"],
            _ => &[],
        };
        for id in caught {
            if sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                let flag = id.replace('_', "-");
                cmd.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("`--{flag}` is for the client subcommands; `interpose {name}` talks to no server"),
                )
                .exit();
            }
        }
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Prints a command-line error and exits. clap's usage line under an error lists every
/// option it saw as given, those set from the environment too (`Usage: interpose export
/// --out <OUT> --server <SERVER>`), which reads as if they were required: they are left out.
fn usage_error(cmd: &clap::Command, e: clap::Error) -> ! {
    if !e.use_stderr() {
        e.exit();
    }
    let mut from_env = Vec::new();
    env_options(cmd, &mut from_env);
    let text = e.render().to_string();
    for line in text.lines() {
        if line.starts_with("Usage: ") {
            eprintln!("{}", without_options(line, &from_env));
        } else {
            eprintln!("{line}");
        }
    }
    std::process::exit(e.exit_code());
}

/// The long names of the options of `cmd` and its subcommands whose environment variable is
/// set.
fn env_options(cmd: &clap::Command, out: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        if let (Some(var), Some(long)) = (arg.get_env(), arg.get_long())
            && std::env::var_os(var).is_some_and(|v| !v.is_empty())
        {
            out.push(format!("--{long}"));
        }
    }
    for sub in cmd.get_subcommands() {
        env_options(sub, out);
    }
}

/// `line` without the options named in `drop` and their `<VALUE>`s.
fn without_options(line: &str, drop: &[String]) -> String {
    let mut words = line.split(' ').peekable();
    let mut kept = Vec::new();
    while let Some(w) = words.next() {
        if drop.iter().any(|d| d == w) {
            if words.peek().is_some_and(|v| v.starts_with('<')) {
                words.next();
            }
            continue;
        }
        kept.push(w);
    }
    kept.join(" ")
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => up::run(*args).await,
        Command::Conns(cmd) => conns::run(&cli.server, cmd).await,
        Command::History(args) => history::run(&cli.server, args).await,
        Command::Ca(cmd) => ca::run(&cli.server, cmd).await,
        Command::Completions(args) => completions::completions(&args),
        Command::Man(args) => completions::man(&args),
        Command::Export(args) => export::run(&cli.server, args).await,
        Command::Intercept(cmd) => intercept::run(&cli.server, cmd).await,
        Command::Held(cmd) => held::run(&cli.server, cmd).await,
        Command::Replay(args) => replay::run(&cli.server, args).await,
        Command::Web(args) => web::run(&cli.server, args).await,
    }
}

/// Whether `e` is stdout closed by its reader (`interpose history | head`): the end of the
/// output the reader wanted, not a failure.
pub fn is_closed_stdout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// An error and its causes on one line, without repeating a cause already in the message.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out.replace('\n', " ")
}
