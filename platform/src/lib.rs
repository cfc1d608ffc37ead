//! What every Interpose process shares around the contract (the `proto` crate).
//!
//! Serving a set of services with health, reflection and token checks ([`serve`]), the
//! bounds on unused connections ([`accept`]), on the HTTP/2 preface ([`preface`]) and on
//! streams ([`streams`]); connecting as a client ([`client`]) to one URL or to several
//! replicas that fail over ([`failover`]); the one retry policy of every loop that
//! reconnects ([`retry`]); the API token ([`token`]) and mutual TLS for the management plane
//! ([`mtls`]); where a proxy's ingest stream goes ([`ingest`]) and its holds go ([`hold`]);
//! the flags of every service that reads the registry ([`registry_reader`]); private data
//! directories ([`private`]), files written where the user asked ([`out_file`]) and the
//! process limits every binary sets ([`limits`]).

pub mod accept;
pub mod client;
pub mod failover;
pub mod hold;
pub mod ingest;
pub mod limits;
pub mod mtls;
pub mod out_file;
pub mod preface;
pub mod private;
pub mod registry_reader;
pub mod retry;
pub mod serve;
pub mod streams;
pub mod token;
