//! Security of the control plane and of images: HMAC manifests over image
//! directories ([`manifest`], hashed while CRIU writes by [`follow`]) and the
//! cluster PKI for mTLS ([`pki`]), and the checks that a node joining a
//! cluster has the right certificate and shared path ([`membership`]).

pub mod follow;
pub mod manifest;
pub mod membership;
pub mod pki;
