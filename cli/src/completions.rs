//! `interpose completions SHELL` and `interpose man`: shell completion scripts and man pages
//! generated from the clap definitions that parse the command line, so they never drift from it.

use std::{io::Write, path::PathBuf};

use anyhow::Context;
use clap::CommandFactory;

/// Options of `interpose completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for (on stdout).
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
    #[command(flatten)]
    pub not_a_client: crate::NotAClient,
}

/// Options of `interpose man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write interpose.1 and one page per subcommand (interpose-conns.1, ...) into this
    /// folder; without it, interpose.1 goes to stdout.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    #[command(flatten)]
    pub not_a_client: crate::NotAClient,
}

/// Writes the completion script for `args.shell` to stdout.
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = crate::Cli::command();
    // Into memory first: clap_complete panics when its writer fails (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "interpose", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(())
}

/// Writes the man page(s).
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let cmd = crate::Cli::command();
    match &args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            out.flush()?;
        }
    }
    Ok(())
}
