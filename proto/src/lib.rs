//! The Interpose gRPC contract.
//!
//! Generated code for the six services (and for the registry's stored history format) lives
//! here and only here, with the few pure pieces every user of the messages shares: the
//! codec the generated code uses ([`codec`]), the JSON/CLI names of the enums ([`names`]),
//! timestamp conversion ([`time`]), hex ([`hex`]) and byte sizes on the command line
//! ([`size`]). A client in Rust or a test that wants the messages depends on this crate
//! alone; the server stack every Interpose process shares (serving, tokens, mTLS, failover,
//! retry) is the `platform` crate's. The fuzz targets want no messages at all: they depend on
//! the `protocols` crate (the sans-I/O parsers and writers) alone.

pub mod codec;
pub mod hex;
pub mod names;
pub mod size;
pub mod time;

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
