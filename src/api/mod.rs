//! The `mosix.v1` gRPC API: generated types ([`pb`]), the one place where
//! proto and core types meet ([`convert`]), client helpers ([`client`]),
//! and the agent's transport: its gRPC services ([`server`]) and how it
//! reaches other agents ([`peers`]). This folder imports `agent`, never the
//! other way round.

pub mod client;
pub mod convert;
pub mod convert_checkpoint;
pub mod convert_exec;
pub mod peers;
pub mod server;

/// Generated from `proto/mosix/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("mosix.v1");
}

/// Serialized descriptors, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mosix_v1_descriptor");
