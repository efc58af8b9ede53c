//! The balancer: a pure policy ([`policy`]) decides which job should move
//! where from one snapshot of the cluster ([`view`]); the [`orchestrator`]
//! carries the plan out through the agents' migrate protocol; [`service`]
//! serves it all over gRPC for outside schedulers (`mos-balance serve`).
//! [`drain`] picks targets for `mosctl drain` by the same placement rule.
//! With etcd, [`leader`] elects one of several balancers and watches the
//! nodes' leases.

pub mod drain;
pub mod feed;
pub mod leader;
pub mod orchestrator;
pub mod policy;
pub mod restart;
pub mod service;
pub mod view;
