//! The balancer: a pure policy ([`policy`]) decides which job should move
//! where from one snapshot of the cluster ([`view`]); the [`orchestrator`]
//! carries the plan out through the agents' migrate protocol; [`service`]
//! serves it all over gRPC for outside schedulers (`mos-balance serve`).
//! [`drain`] picks targets for `mosctl drain` by the same placement rule.

pub mod drain;
pub mod orchestrator;
pub mod policy;
pub mod service;
pub mod view;
