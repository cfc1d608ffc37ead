//! The flags every service that reads the registry takes (export-svc and intercept-svc):
//! where the registry is, who may call, stream bounds and mTLS, declared once and flattened
//! into each service's command line.

/// The flags of a standalone service that reads the registry (intercept-svc, export-svc)
/// besides its listen address, the same in each: the registry's URLs, who may call,
/// streaming bounds and mTLS.
#[derive(Debug, clap::Args)]
pub struct RegistryReaderArgs {
    /// gRPC URL of the registry; for registry-svc replicas serving one database, several
    /// (comma-separated or repeated), tried in turn.
    #[arg(
        long,
        required = true,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        value_parser = crate::failover::list_entry
    )]
    pub registry: Vec<String>,
    /// Who may call: the token (or `--no-auth`), as every server takes it. The token is
    /// also what this service sends to the registry.
    #[command(flatten)]
    pub auth: crate::token::AuthOptions,
    /// Bounds on streaming calls, as every server takes them.
    #[command(flatten)]
    pub streams: crate::streams::StreamArgs,
    /// mTLS, for this service's API and towards an https:// --registry.
    #[command(flatten)]
    pub mtls: crate::mtls::ServiceTlsArgs,
}
