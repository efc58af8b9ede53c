//! mosix: MOSIX for today's Linux, with no kernel patch.
//!
//! A process starts on some node; when load is uneven it is frozen with CRIU,
//! its images go to a path every node shares, and it is restored on the
//! least-loaded node. The crate is a core library with thin binaries:
//!
//! - [`core`]: job/node identifiers, the job registry on the shared path, the
//!   cluster file. No transport types.
//! - [`criu`]: the CRIU driver, behind the [`criu::CheckpointEngine`] trait.
//! - [`agent`]: what `mosixd` does on one node (launch, reap, dump, restore,
//!   migrate), as [`agent::AgentAction`]s, plus its gRPC service.
//! - [`api`]: the generated `mosix.v1` gRPC types and the proto ↔ core conversion.
//! - [`balancer`]: the pure policy, the orchestrator and the balancer service.
//! - [`gateway`]: `mosgw`, the HTTP/TCP front end that follows migrations.
//! - [`local`]: the local cluster (network namespaces on one machine).
//! - [`placement`]: the pure slot/reservation table that places foreground jobs.
//! - [`security`]: image manifests (HMAC) and the cluster PKI for mTLS.
//! - [`mosmake`]: parallel make over the cluster (which lines go remote, the
//!   run statistics).
//! - [`cli`]: the user commands (`mosctl`, `mosrun`, `mos-balance`, `mosmon`).

pub mod agent;
pub mod api;
pub mod balancer;
pub mod checkpoint;
pub mod cli;
pub mod coord;
pub mod core;
pub mod criu;
pub mod gateway;
pub mod local;
pub mod mosmake;
pub mod placement;
pub mod security;
