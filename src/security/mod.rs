//! Security of the control plane and of images: HMAC manifests over image
//! directories ([`manifest`], hashed while CRIU writes by [`follow`]) and the
//! cluster PKI for mTLS ([`pki`]).

pub mod follow;
pub mod manifest;
pub mod pki;
