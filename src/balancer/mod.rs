//! The balancer: a pure policy ([`policy`]), an orchestrator that carries out
//! its plans through the agents, and a gRPC service for outside schedulers.

pub mod policy;
