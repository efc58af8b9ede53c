//! The local cluster: several nodes on one machine.
