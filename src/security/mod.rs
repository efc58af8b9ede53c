//! Security of the control plane and of images: HMAC manifests over image
//! directories ([`manifest`]) and the cluster PKI for mTLS ([`pki`]).

pub mod manifest;
pub mod pki;
