//! A job's own network address, as its record keeps it (see
//! `agent::jobnet` for why jobs may have one): it travels with the job from
//! node to node, so it lives in the core record, not in an agent.

use std::net::Ipv4Addr;

/// A job's own address, as its record keeps it (it travels with the job).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobNet {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// `02:6d:` followed by the address's four bytes.
    pub mac: String,
}

impl JobNet {
    pub fn new(ip: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Self {
        Self {
            ip,
            prefix,
            gateway,
            mac: mac_for(ip),
        }
    }
}

/// The fixed MAC of an address: locally administered (`02`), `6d` ('m').
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:6d:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}
