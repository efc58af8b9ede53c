//! Integration tests: the real binaries on a real local cluster (network
//! namespaces, cgroups, CRIU). They need root and CRIU ≥ 4.2; without them
//! they skip loudly, unless `MOSIX_REQUIRE_PRIVILEGED=1` (set by `make test`
//! and CI), in which case a missing precondition fails the test.

mod support;

mod admin;
mod balancer;
mod cgroups;
mod checkpoint;
mod coord;
mod faults;
mod foreground;
mod gateway;
mod jobnet;
mod migration;
mod mosmake;
mod noshared;
mod package;
mod postcopy_failure;
mod precopy;
mod security;
