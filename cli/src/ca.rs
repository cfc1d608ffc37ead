//! `interpose ca`: fetch or regenerate the proxy's CA certificate over gRPC, and issue
//! client certificates for the management plane's mTLS (locally, from the data directory).

use clap::Subcommand;
use proto::ca::{
    CaCertificate, GetCaCertificateRequest, RegenerateCaRequest,
    certificate_authority_client::CertificateAuthorityClient,
};

use crate::{
    ServerArgs,
    client::{channel, status},
};

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write the CA certificate to a file, to install in the program under test.
    Export {
        /// Where to write it: a file path, or `-` for stdout (the summary line then goes to
        /// stderr).
        #[arg(long)]
        out: std::path::PathBuf,
        /// DER instead of PEM (what Android and Windows importers often want).
        #[arg(long)]
        der: bool,
        /// Replace the --out file if it exists (never a symbolic link; the file is 0600).
        #[arg(long)]
        force: bool,
    },
    /// Replace the CA with a fresh one; clients must then trust the new certificate.
    Regenerate,
    /// Issue a client certificate for a server started with --grpc-tls, signed by the
    /// management CA in DATA_DIR/mtls (created when missing). Works on the files, not over
    /// gRPC: run it where the server's data directory is, as its owner.
    IssueClient {
        /// The client's name: its certificate's subject (CN) and its files' names.
        #[arg(long)]
        name: String,
        /// Folder to write NAME-cert.pem, NAME-key.pem and ca-cert.pem into (0600 each).
        #[arg(long)]
        out: std::path::PathBuf,
        /// The server's data directory. Default: the one `interpose up` uses.
        #[arg(long, env = "INTERPOSE_DATA_DIR", value_name = "DIR")]
        data_dir: Option<std::path::PathBuf>,
        /// How long the certificate is valid.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid_for: std::time::Duration,
    },
}

/// `interpose ca issue-client`: see [`CaCommand::IssueClient`].
fn issue_client(
    name: &str,
    out: &std::path::Path,
    data_dir: Option<std::path::PathBuf>,
    valid_for: std::time::Duration,
) -> anyhow::Result<()> {
    let data_dir = proxy_core::cli::data_dir(data_dir)?;
    anyhow::ensure!(
        data_dir.is_dir(),
        "no data directory at {}: pass the server's --data-dir",
        data_dir.display()
    );
    let authority = platform::mtls::Authority::load_or_create(&platform::mtls::dir(&data_dir))?;
    let issued = authority.issue_client(name, valid_for)?;
    let [cert, key, ca] = platform::mtls::authority::write_client(&authority, &issued, name, out)?;
    crate::say!(
        "issued client certificate CN={name}, valid for {} days:\n  --client-cert {} --client-key {} --ca-cert {}",
        valid_for.as_secs() / 86_400,
        cert.display(),
        key.display(),
        ca.display()
    );
    Ok(())
}

fn summary(c: &CaCertificate) -> String {
    format!("{} (sha256 {})", c.subject, c.sha256)
}

/// Runs one `ca` subcommand.
pub async fn run(server: &ServerArgs, cmd: CaCommand) -> anyhow::Result<()> {
    if let CaCommand::IssueClient {
        name,
        out,
        data_dir,
        valid_for,
    } = cmd
    {
        return issue_client(&name, &out, data_dir, valid_for);
    }
    let mut client = CertificateAuthorityClient::new(channel(server).await?);
    match cmd {
        CaCommand::Export { out, der, force } => {
            if out.as_os_str() != "-" {
                platform::out_file::check(&out, force)?;
            }
            let c = client
                .get_ca_certificate(GetCaCertificateRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let bytes: &[u8] = if der { &c.der } else { c.pem.as_bytes() };
            if out.as_os_str() == "-" {
                use std::io::Write;
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(bytes)?;
                stdout.flush()?;
                eprintln!("wrote CA certificate {} to stdout", summary(&c));
            } else {
                platform::out_file::write(&out, bytes, force)?;
                crate::say!("wrote CA certificate {} to {}", summary(&c), out.display());
            }
        }
        CaCommand::Regenerate => {
            let c = client
                .regenerate_ca(RegenerateCaRequest {})
                .await
                .map_err(status)?
                .into_inner();
            crate::say!("new CA certificate {} at {}", summary(&c), c.path);
        }
        CaCommand::IssueClient { .. } => unreachable!("handled above"),
    }
    Ok(())
}
