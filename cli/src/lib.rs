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
pub mod table;
pub mod up;
pub mod web;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Where client subcommands find the server, and how they authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// gRPC URL of the Interpose server.
    #[arg(
        long,
        global = true,
        env = "INTERPOSE_SERVER",
        hide_env_values = true,
        default_value = "http://127.0.0.1:50051",
        help_heading = "Server"
    )]
    pub server: String,
    /// Bearer token for the server. Default: the token file of the default data directory,
    /// sent only to the default server or to the URL `interpose up` recorded there.
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
    /// `interpose ca issue-client`. Default: the default data directory's
    /// mtls/client-cert.pem, for the server `interpose up` recorded there.
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
    /// Columns (--columns): conn, seq, dir, time, len, data (all shown by default). A packet
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
    let matches = cmd.get_matches_mut();
    if let Some((name, sub)) = matches.subcommand() {
        let caught: &[&str] = match name {
            // (`up --client-cert` is its own: for upstream TLS servers.)
            "up" => &["server", "client_key", "ca_cert"],
            "completions" | "man" => &["server", "token", "token_file"],
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
