//! The `interpose.ca.v1.CertificateAuthority` gRPC service: hands out the CA certificate
//! (never the key) and regenerates the CA for a running proxy.

use std::sync::Arc;

use proto::ca::{
    CaCertificate, GetCaCertificateRequest, RegenerateCaRequest,
    certificate_authority_server::{CertificateAuthority, CertificateAuthorityServer},
};
use tonic::{Request, Response, Status};

use super::{Splicer, ca::Ca};

/// Serves the CA of one [`Splicer`].
#[derive(Clone)]
pub struct CaService {
    splicer: Arc<Splicer>,
}

impl CaService {
    /// The service, ready to add to a gRPC server.
    pub fn server(splicer: Arc<Splicer>) -> CertificateAuthorityServer<Self> {
        CertificateAuthorityServer::new(Self { splicer })
    }
}

/// What a client learns about a CA.
pub fn describe(ca: &Ca) -> CaCertificate {
    let der = ca.cert_der().as_ref();
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let sha256 = proto::hex::encode(digest.as_ref());
    let not_after = ca.not_after();
    CaCertificate {
        pem: ca.cert_pem().to_string(),
        der: der.to_vec(),
        subject: ca.subject().to_string(),
        not_after: Some(prost_types::Timestamp {
            seconds: not_after.unix_timestamp(),
            nanos: 0,
        }),
        sha256,
        path: ca.cert_path().display().to_string(),
    }
}

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn get_ca_certificate(
        &self,
        _req: Request<GetCaCertificateRequest>,
    ) -> Result<Response<CaCertificate>, Status> {
        Ok(Response::new(describe(&self.splicer.ca())))
    }

    async fn regenerate_ca(
        &self,
        _req: Request<RegenerateCaRequest>,
    ) -> Result<Response<CaCertificate>, Status> {
        let dir = self.splicer.ca().dir().to_path_buf();
        let ca = tokio::task::spawn_blocking(move || Ca::regenerate(&dir))
            .await
            .map_err(|e| Status::internal(format!("regenerating the CA: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let ca = Arc::new(ca);
        self.splicer.replace_ca(ca.clone());
        Ok(Response::new(describe(&ca)))
    }
}
