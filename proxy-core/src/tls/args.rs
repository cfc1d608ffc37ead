//! Command-line options of the TLS splice, for `proxy-core` and `interpose up` to
//! flatten into their own clap parsers (`#[command(flatten)] tls: TlsArgs`).

use std::path::PathBuf;

use super::pattern::HostPattern;
use super::upstream::{ClientCertSpec, UpstreamOptions};
use super::{LeafOptions, SpliceOptions};

/// TLS splice flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Extra PEM root certificates to trust for upstream servers (repeatable), besides the
    /// system roots.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// Accept any upstream certificate (logged, and marked in every record).
    #[arg(long = "upstream-insecure")]
    pub upstream_insecure: bool,
    /// Relay connections to this host without terminating TLS (repeatable; `*.example.com`
    /// matches every name below example.com; IP addresses allowed).
    #[arg(long = "passthrough", value_name = "HOST", value_parser = parse_pattern)]
    pub passthrough: Vec<HostPattern>,
    /// Client certificate for upstream servers that ask for one (repeatable):
    /// HOST=CERT,KEY with PEM files; HOST may be a wildcard pattern.
    #[arg(long = "client-cert", value_name = "HOST=CERT,KEY", value_parser = parse_client_cert)]
    pub client_cert: Vec<ClientCertSpec>,
    /// Append NSS key-log lines (both legs) to this file, created with mode 0600, so
    /// Wireshark can decrypt a raw capture of either leg. A symbolic link is refused, and so
    /// is an existing file another user owns or can read (its secrets may already be open
    /// in their hands: remove it, or `chmod 600` it).
    #[arg(long = "keylog", value_name = "FILE")]
    pub keylog: Option<PathBuf>,
}

fn parse_pattern(s: &str) -> Result<HostPattern, String> {
    s.parse()
        .map_err(|e: super::pattern::PatternError| e.to_string())
}

fn parse_client_cert(s: &str) -> Result<ClientCertSpec, String> {
    s.parse()
        .map_err(|e: super::upstream::UpstreamError| e.to_string())
}

impl TlsArgs {
    /// The [`SpliceOptions`] these flags describe (default leaf cache bounds and
    /// handshake timeout, system roots on).
    pub fn to_options(&self) -> SpliceOptions {
        SpliceOptions {
            upstream: UpstreamOptions {
                system_roots: true,
                extra_roots: self.upstream_ca.clone(),
                insecure: self.upstream_insecure,
                client_certs: self.client_cert.clone(),
            },
            leaves: LeafOptions::default(),
            passthrough: self.passthrough.clone(),
            keylog: self.keylog.clone(),
            handshake_timeout: std::time::Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tls: TlsArgs,
    }

    #[test]
    fn parses_all_flags() {
        let cli = Cli::try_parse_from([
            "x",
            "--upstream-ca",
            "/a.pem",
            "--upstream-ca",
            "/b.pem",
            "--passthrough",
            "*.bank.example",
            "--passthrough",
            "10.0.0.1",
            "--client-cert",
            "*.iot.example=/c.pem,/k.pem",
            "--keylog",
            "/tmp/keys",
            "--upstream-insecure",
        ])
        .expect("parse");
        let o = cli.tls.to_options();
        assert_eq!(o.upstream.extra_roots.len(), 2);
        assert!(o.upstream.insecure);
        assert_eq!(o.passthrough.len(), 2);
        assert_eq!(o.upstream.client_certs.len(), 1);
        assert_eq!(o.keylog, Some(PathBuf::from("/tmp/keys")));
    }

    #[test]
    fn bad_values_are_rejected_with_the_reason() {
        let err = Cli::try_parse_from(["x", "--client-cert", "nohost"]).expect_err("bad");
        assert!(err.to_string().contains("HOST=CERT,KEY"), "{err}");
        let err = Cli::try_parse_from(["x", "--passthrough", "a*b"]).expect_err("bad");
        assert!(err.to_string().contains("invalid host pattern"), "{err}");
    }
}
