//! `interpose ca`: fetch or regenerate the proxy's CA certificate over gRPC.

use anyhow::Context;
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
        /// Where to write it.
        #[arg(long)]
        out: std::path::PathBuf,
        /// DER instead of PEM (what Android and Windows importers often want).
        #[arg(long)]
        der: bool,
    },
    /// Replace the CA with a fresh one; clients must then trust the new certificate.
    Regenerate,
}

fn summary(c: &CaCertificate) -> String {
    format!("{} (sha256 {})", c.subject, c.sha256)
}

/// Runs one `ca` subcommand.
pub async fn run(server: &ServerArgs, cmd: CaCommand) -> anyhow::Result<()> {
    let mut client = CertificateAuthorityClient::new(channel(server).await?);
    match cmd {
        CaCommand::Export { out, der } => {
            let c = client
                .get_ca_certificate(GetCaCertificateRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let bytes: &[u8] = if der { &c.der } else { c.pem.as_bytes() };
            std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote CA certificate {} to {}", summary(&c), out.display());
        }
        CaCommand::Regenerate => {
            let c = client
                .regenerate_ca(RegenerateCaRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!("new CA certificate {} at {}", summary(&c), c.path);
        }
    }
    Ok(())
}
