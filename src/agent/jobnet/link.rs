//! The job's link on the host and the frames sent on it: a veth's index,
//! deleting it or setting it up or down through rtnetlink, and raw frames
//! (a gratuitous ARP from inside the job's namespace, a frame sent again
//! from the bridge, see `replay`).
//!
//! Why rtnetlink and packet sockets rather than `ip` and `arping`: these
//! run while the job is frozen, and forking a tool took ~15 ms each time
//! here, the request itself well under one.

use super::*;

/// Whether this process's network namespace has a link `name`. Not
/// `/sys/class/net`: an agent in a node's namespace sees the sysfs of
/// whoever mounted it, i.e. the host's links.
pub fn link_exists(name: &str) -> bool {
    link_index(name).is_ok()
}

/// The index of the link `name` in this thread's network namespace.
pub(crate) fn link_index(name: &str) -> std::io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a link name"))?;
    // SAFETY: a NUL-terminated name that outlives the call; it only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// A raw packet socket for `protocol` (an `ETH_P_*` in network order; 0:
/// none, so that nothing is received until `bind` names a link and a
/// protocol).
pub(crate) fn packet_socket(protocol: u16) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Delete a link of this node by name (a job's host veth); Ok if absent.
///
/// Through rtnetlink, not `ip link del`: a source deletes the veth of a job
/// it just dumped while the job is frozen, and forking and running `ip`
/// took ~15 ms of that here, the request itself well under one.
pub fn delete_link(name: &str) -> Result<(), JobNetError> {
    match rtnl_delete_link(Link::Name(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(JobNetError::Setup(format!(
            "deleting the job's veth {name}: {e}"
        ))),
    }
}

/// An interface, by name or by index.
#[derive(Debug, Clone, Copy)]
pub(super) enum Link<'a> {
    Name(&'a str),
    Index(u32),
}

/// RTM_DELLINK of one interface in this process's network namespace, and
/// the kernel's answer (an errno, or 0).
pub(super) fn rtnl_delete_link(link: Link<'_>) -> std::io::Result<()> {
    rtnl_link(libc::RTM_DELLINK, link, 0, 0)
}

/// Set one interface up or down (RTM_NEWLINK on IFF_UP).
fn rtnl_set_up(link: Link<'_>, up: bool) -> std::io::Result<()> {
    let flags = if up { libc::IFF_UP as u32 } else { 0 };
    rtnl_link(libc::RTM_NEWLINK, link, flags, libc::IFF_UP as u32)
}

/// One rtnetlink request about one interface (`kind`, with the ifinfomsg's
/// `flags` and `change` mask), and the kernel's answer (an errno, or 0).
fn rtnl_link(kind: u16, link: Link<'_>, flags: u32, change: u32) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // nlmsghdr (16 bytes), ifinfomsg (16: the index, or 0 and then one
    // attribute IFLA_IFNAME, rtattr (4) + the name + NUL, padded).
    const HDR: usize = 16;
    const IFINFO: usize = 16;
    let (index, name) = match link {
        Link::Index(i) => (i, &[][..]),
        Link::Name(n) => {
            let bytes = n.as_bytes();
            if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
                return Err(Error::new(ErrorKind::InvalidInput, "not an interface name"));
            }
            (0, bytes)
        }
    };
    let attr_len = if name.is_empty() {
        0
    } else {
        4 + name.len() + 1
    };
    let total = HDR + IFINFO + ((attr_len + 3) & !3);
    let mut msg = vec![0u8; total];
    msg[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&kind.to_ne_bytes());
    let nl_flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    msg[6..8].copy_from_slice(&nl_flags.to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family, pad, type (u16), the index (i32), flags, change.
    msg[HDR + 4..HDR + 8].copy_from_slice(&(index as i32).to_ne_bytes());
    msg[HDR + 8..HDR + 12].copy_from_slice(&flags.to_ne_bytes());
    msg[HDR + 12..HDR + 16].copy_from_slice(&change.to_ne_bytes());
    if !name.is_empty() {
        let a = HDR + IFINFO;
        msg[a..a + 2].copy_from_slice(&(attr_len as u16).to_ne_bytes());
        msg[a + 2..a + 4].copy_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
        msg[a + 4..a + 4 + name.len()].copy_from_slice(name);
    }
    // SAFETY: plain syscalls on a socket this function owns, with buffers
    // that outlive them.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: see above.
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    loop {
        // SAFETY: see above.
        let n = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n < 0 {
            let e = Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        // The answer to a request with NLM_F_ACK: NLMSG_ERROR, whose
        // payload starts with the errno (0: done).
        if n < HDR + 4 {
            return Err(Error::new(ErrorKind::InvalidData, "short netlink answer"));
        }
        let kind = u16::from_ne_bytes([reply[4], reply[5]]);
        if kind != libc::NLMSG_ERROR as u16 {
            continue;
        }
        let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
        return if errno == 0 {
            Ok(())
        } else {
            Err(Error::from_raw_os_error(-errno))
        };
    }
}

/// Cut a stopped source (post-copy, or streamed pages) off the network
/// (up = false) or put it back after a failed move (up = true).
///
/// Through rtnetlink, not `ip link set`: a source takes the link down
/// while the job is frozen (see [`delete_link`]).
pub fn set_link(name: &str, up: bool) {
    match rtnl_set_up(Link::Name(name), up) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
        Err(e) => tracing::warn!(
            "setting the job's veth {name} {}: {e}",
            if up { "up" } else { "down" }
        ),
    }
}

/// One gratuitous ARP frame (an ARP request for `ip` from `ip`, broadcast).
fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target MAC stays zero
    f[38..42].copy_from_slice(&ip.octets());
    f
}

pub(super) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    v.try_into().ok()
}

/// Announce the job's address from inside its namespace, now that its
/// sockets exist: the bridges on the way learn the MAC's new port. Runs on a
/// thread of its own (it enters the job's namespace, which a pooled thread
/// must never do), which answers once the frames are sent and only then
/// closes its packet socket: the kernel's close of a packet socket waits
/// for an RCU grace period (`synchronize_net` in `packet_release`), 6-24 ms
/// here, and the job's move need not wait for that.
pub fn announce(pid: i32, net: &JobNet) -> Result<(), JobNetError> {
    let mac = parse_mac(&net.mac).ok_or_else(|| JobNetError::Config(net.mac.clone()))?;
    let frame = garp_frame(mac, net.ip);
    let ns = format!("/proc/{pid}/ns/net");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut socket = None;
        let sent = send_garp(&ns, &frame, &mut socket);
        let _ = tx.send(sent);
        // Closed only now (see above).
        drop(socket);
    });
    rx.recv().map_err(|_| {
        JobNetError::Setup("the gratuitous ARP thread ended without an answer".into())
    })?
}

/// Enter the namespace `ns` (this thread only), open a packet socket on its
/// interface into `socket` (left open for the caller to close) and send
/// `frame` twice.
fn send_garp(ns: &str, frame: &[u8; 42], socket: &mut Option<OwnedFd>) -> Result<(), JobNetError> {
    let f = std::fs::File::open(ns).map_err(|e| JobNetError::Setup(format!("{ns}: {e}")))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| JobNetError::Setup(format!("setns {ns}: {e}")))?;
    let idx = link_index(JOB_IFACE)
        .map_err(|e| JobNetError::Setup(format!("no {JOB_IFACE} in the job's namespace: {e}")))?;
    let proto = (libc::ETH_P_ARP as u16).to_be();
    let fd = socket.insert(
        packet_socket(proto).map_err(|e| JobNetError::Setup(format!("packet socket: {e}")))?,
    );
    let mut err = None;
    for _ in 0..2 {
        if let Err(e) = send_link_frame(fd, idx as i32, proto, [0xff; 6], frame) {
            err = Some(e);
        }
    }
    match err {
        Some(e) => Err(JobNetError::Setup(format!("gratuitous ARP: {e}"))),
        None => Ok(()),
    }
}

/// Send one whole Ethernet `frame` out of the link `ifindex` to `dest`, as
/// `protocol` (an `ETH_P_*` in network order): the gratuitous ARP here, and
/// the frames `replay` sends again.
pub(crate) fn send_link_frame(
    fd: &OwnedFd,
    ifindex: i32,
    protocol: u16,
    dest: [u8; 6],
    frame: &[u8],
) -> std::io::Result<()> {
    // SAFETY: an all-zero sockaddr_ll is valid; its fields are set below.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = protocol;
    to.sll_ifindex = ifindex;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&dest);
    // SAFETY: sends our own buffer, with its length, to a sockaddr_ll of
    // the size given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A veth pair `name` / `{name}p`, like a job's (this kernel has no
    /// dummy links), made with ip(8) as a test's own witness.
    fn add_veth(name: &str) -> bool {
        let peer = format!("{name}p");
        let args = ["link", "add", name, "type", "veth", "peer", "name", &peer];
        Command::new("ip").args(args).status().unwrap().success()
    }

    #[test]
    fn a_link_is_set_down_and_up_and_a_missing_one_is_no_error() {
        crate::agent::in_own_netns(|| {
            let ip = |args: &[&str]| Command::new("ip").args(args).output().unwrap();
            assert!(add_veth("mjuptest"));
            let is_up = || {
                let o = ip(&["-o", "link", "show", "mjuptest"]);
                let l = String::from_utf8_lossy(&o.stdout).into_owned();
                let flags = l
                    .split('<')
                    .nth(1)
                    .and_then(|f| f.split('>').next())
                    .unwrap_or("");
                flags.split(',').any(|f| f == "UP")
            };
            assert!(!is_up(), "a new veth starts down");
            set_link("mjuptest", true);
            assert!(is_up());
            set_link("mjuptest", false);
            assert!(!is_up());
            delete_link("mjuptest").unwrap();
            // Gone: nothing to do, and no panic.
            set_link("mjuptest", true);
        });
    }

    #[test]
    fn a_link_is_deleted_by_name_and_a_missing_one_is_no_error() {
        // In a network namespace of the test's own thread (and of the `ip`
        // it runs), so the machine's links are never touched.
        crate::agent::in_own_netns(|| {
            assert!(add_veth("mjdeltest"));
            assert!(link_exists("mjdeltest"));
            delete_link("mjdeltest").unwrap();
            assert!(!link_exists("mjdeltest") && !link_exists("mjdeltestp"));
            // Already gone: nothing to do.
            delete_link("mjdeltest").unwrap();
            // By index, as a job's leaving does in the background: that
            // link only, never a new one of the same name.
            assert!(add_veth("mjdeltest"));
            let old = link_index("mjdeltest").unwrap();
            delete_link("mjdeltest").unwrap();
            assert!(add_veth("mjdeltest"));
            let e = rtnl_delete_link(Link::Index(old)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
            assert!(link_exists("mjdeltest"), "the new link of that name stays");
            let new = link_index("mjdeltest").unwrap();
            rtnl_delete_link(Link::Index(new)).unwrap();
            assert!(!link_exists("mjdeltest"));
            let e = delete_link("an-interface-name-too-long").unwrap_err();
            assert!(e.to_string().contains("not an interface name"), "{e}");
            // The loopback cannot be deleted: the kernel's refusal comes back.
            assert!(delete_link("lo").is_err());
        });
    }

    #[test]
    fn garp_frame_announces_the_address() {
        let f = garp_frame([2, 0x6d, 10, 77, 1, 100], Ipv4Addr::new(10, 77, 1, 100));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[28..32], &[10, 77, 1, 100]);
        assert_eq!(&f[38..42], &[10, 77, 1, 100]);
    }
}
