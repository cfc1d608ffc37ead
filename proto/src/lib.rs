//! The Interpose gRPC contract.
//!
//! Generated code for the four services (and for the registry's stored history format) lives
//! here and only here, with the small pieces every server and client of the project shares:
//! the JSON/CLI names of the enums ([`names`]), timestamp conversion ([`time`]), serving with
//! health, reflection and token checks ([`serve`]), connecting as a client ([`client`]) to
//! one URL or to several replicas that fail over ([`failover`]), the one retry policy of
//! every loop that reconnects ([`retry`]), the API token ([`token`]), where a proxy's ingest
//! stream goes ([`ingest`]) and its holds go ([`hold`]), private data directories
//! ([`private`]), byte sizes on the command line ([`size`]), the open-files limit
//! ([`limits`]), the HTTP/2 preface deadline of every gRPC connection ([`preface`]), the
//! bounds on unused connections ([`accept`]) and on streams ([`streams`]), mutual TLS for
//! the management plane ([`mtls`]) and files written where the user asked ([`out_file`]).

pub mod accept;
pub mod client;
pub mod codec;
pub mod failover;
pub mod fuzz_corpus;
pub mod hex;
pub mod hold;
pub mod ingest;
pub mod limits;
pub mod mtls;
pub mod names;
pub mod out_file;
pub mod preface;
pub mod private;
pub mod registry_reader;
pub mod retry;
pub mod serve;
pub mod size;
pub mod streams;
pub mod time;
pub mod token;

/// Generated code, nested as the protobuf packages are so that cross-package paths resolve.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod interpose {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("interpose.common.v1");
        }
    }
    pub mod registry {
        pub mod v1 {
            tonic::include_proto!("interpose.registry.v1");
        }
        /// The registry's on-disk history format (not part of any RPC).
        pub mod store {
            pub mod v1 {
                tonic::include_proto!("interpose.registry.store.v1");
            }
        }
    }
    pub mod intercept {
        pub mod v1 {
            tonic::include_proto!("interpose.intercept.v1");
        }
    }
    pub mod export {
        pub mod v1 {
            tonic::include_proto!("interpose.export.v1");
        }
    }
    pub mod ca {
        pub mod v1 {
            tonic::include_proto!("interpose.ca.v1");
        }
    }
    pub mod replay {
        pub mod v1 {
            tonic::include_proto!("interpose.replay.v1");
        }
    }
}

pub use interpose::ca::v1 as ca;
pub use interpose::common::v1 as common;
pub use interpose::export::v1 as export;
pub use interpose::intercept::v1 as intercept;
pub use interpose::registry::store::v1 as registry_store;
pub use interpose::registry::v1 as registry;
pub use interpose::replay::v1 as replay;

/// The encoded `FileDescriptorSet` of every Interpose proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/interpose_descriptor.bin"));
