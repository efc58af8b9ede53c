//! Frames that reached a moving job's own address while it was frozen, sent
//! again once it runs (on the target, or back on the source).
//!
//! Why: while CRIU holds the job's namespace locked, every TCP segment a
//! peer sends it is dropped, and the peer only sends it again when its own
//! retransmission timer fires: a tail-loss probe about 200 ms after the
//! send (its delay includes the 200 ms delayed-ACK allowance when one
//! segment is in flight), then an RTO at about 420 ms, then 830 ms. So the
//! peer's pause was the first of those after the job was back, not the
//! frozen time: ~210 ms for a move frozen 125 ms, ~420 ms for one frozen
//! 300 ms (BENCHMARKS.md section 8). The source's agent keeps a copy of
//! each frame its node's bridge hands to the job's veth during the freeze
//! ([`Capture`]), and once the job answers again it sends them once more
//! from the bridge ([`resend`]): the restored socket takes the data, ACKs
//! it, and the peer goes on without waiting for its timer.
//!
//! Every kind of move keeps frames: full copy and post-copy, with a shared
//! path or without.
//!
//! Safe by TCP's own rules: a segment the job did take before the lock is a
//! duplicate, which its kernel drops with a duplicate ACK. Only IPv4 TCP
//! frames addressed to the job's IP are kept, at most [`MAX_FRAMES`] and
//! [`MAX_BYTES`], and the resent copies carry the bridge's MAC as their
//! source, so no bridge learns the peer's MAC on the wrong port. Best
//! effort throughout: without a copy the peer still has its timer.

use super::{jobnet, Agent};
use crate::core::{JobId, JobRecord};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most frames kept per move.
pub const MAX_FRAMES: usize = 1024;
/// Most bytes kept per move.
pub const MAX_BYTES: usize = 4 << 20;
/// A capture ends by itself after this long, whatever happens to the move.
const MAX_CAPTURE: Duration = Duration::from_secs(60);
/// How often the capturing thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(5);
const ETH_HDR: usize = 14;
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

/// Copies of the frames a job's veth carried towards its address, kept by a
/// thread from [`Capture::start`] until [`Capture::finish`] or the veth's
/// end (the job's namespace is gone with the dump).
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
    started: Instant,
}

/// The captures of this node's jobs that are being moved, by job.
pub(crate) type Held = std::sync::Mutex<std::collections::HashMap<JobId, Capture>>;

impl Agent {
    /// Start keeping what reaches `rec`'s own address while CRIU freezes it
    /// for a move; [`Self::resend_held`] sends it on once the job runs.
    pub(crate) fn hold_frames(&self, rec: &JobRecord) {
        let Some(net) = &rec.net else {
            return;
        };
        match Capture::start(&jobnet::host_veth(rec.id.as_str()), net.ip) {
            Ok(c) => {
                if let Ok(mut held) = self.held_frames.lock() {
                    // Those of moves that never ended (the job failed).
                    held.retain(|_, c| c.started.elapsed() < MAX_CAPTURE);
                    held.insert(rec.id.clone(), c);
                }
            }
            Err(e) => {
                tracing::debug!(job = %rec.id, "frames reaching it while frozen are not kept: {e}")
            }
        }
    }

    /// `job` answers again, on the target or back here: send it what was
    /// kept for it, from this node's job bridge, on a thread of its own
    /// (the capture may still be waking up).
    pub(crate) fn resend_held(&self, job: &JobId) {
        let Some(c) = self.held_frames.lock().ok().and_then(|mut h| h.remove(job)) else {
            return;
        };
        let bridge = self
            .cfg
            .job_net
            .as_ref()
            .map_or(jobnet::DEFAULT_BRIDGE, |n| n.bridge.as_str())
            .to_string();
        let job = job.clone();
        let sent = std::thread::Builder::new()
            .name("held-resend".into())
            .spawn(move || {
                let frames = c.finish();
                match resend(&bridge, &frames) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(job = %job, frames = n, "frames that reached it while frozen sent again"),
                    Err(e) => tracing::warn!(job = %job, "sending again the frames that reached it while frozen: {e}; its peers retransmit on their own"),
                }
            });
        if let Err(e) = sent {
            tracing::warn!("cannot start a thread to resend held frames: {e}");
        }
    }
}

impl Capture {
    /// Start keeping the IPv4 TCP frames that the host side `veth` sends to
    /// `ip`. A packet socket on the veth sees them as outgoing frames, as
    /// the bridge hands them over, before the job's locked namespace drops
    /// them.
    pub fn start(veth: &str, ip: Ipv4Addr) -> std::io::Result<Capture> {
        let ifindex = if_index(veth)?;
        let fd = jobnet::packet_socket(0)?;
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: binds our own socket to a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: POLL.as_micros() as libc::suseconds_t,
        };
        // SAFETY: sets a timeval option on our own socket. A failure
        // leaves reads blocking, which only delays `finish` until the veth
        // is gone; so it is not checked.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("held-frames".into())
            .spawn(move || keep(fd, ip, s))?;
        Ok(Capture {
            stop,
            thread: Some(thread),
            started: Instant::now(),
        })
    }

    /// Stop keeping frames and return those kept, oldest first.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn keep(fd: OwnedFd, ip: Ipv4Addr, stop: Arc<AtomicBool>) -> Vec<Vec<u8>> {
    let started = Instant::now();
    let mut frames = Vec::new();
    let mut bytes = 0;
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Acquire) && started.elapsed() < MAX_CAPTURE {
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: reads into our own buffer, with its length, and a
        // sockaddr_ll of the size given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                // ENETDOWN and the like: the veth is gone with the job's
                // namespace, and nothing more will come.
                _ => break,
            }
        }
        let frame = &buf[..n as usize];
        if from.sll_pkttype == libc::PACKET_OUTGOING
            && is_tcp_to(frame, ip)
            && frames.len() < MAX_FRAMES
            && bytes + frame.len() <= MAX_BYTES
        {
            bytes += frame.len();
            frames.push(frame.to_vec());
        }
    }
    frames
}

/// An untagged Ethernet frame carrying IPv4 TCP addressed to `ip`.
pub fn is_tcp_to(frame: &[u8], ip: Ipv4Addr) -> bool {
    frame.len() >= ETH_HDR + 20
        && frame[12..14] == ETH_P_IP.to_be_bytes()
        && frame[ETH_HDR] >> 4 == 4
        && frame[ETH_HDR + 9] == IPPROTO_TCP
        && frame[ETH_HDR + 16..ETH_HDR + 20] == ip.octets()
}

/// Send `frames` again from `bridge`, each with the bridge's MAC as its
/// source; the bridge forwards them to wherever the job's MAC is now (its
/// gratuitous ARP taught every bridge). Returns how many were sent.
pub fn resend(bridge: &str, frames: &[Vec<u8>]) -> std::io::Result<usize> {
    if frames.is_empty() {
        return Ok(0);
    }
    let ifindex = if_index(bridge)?;
    let mac = read_mac(bridge)?;
    let fd = jobnet::packet_socket(0)?;
    let mut sent = 0;
    for f in frames {
        if f.len() < ETH_HDR {
            continue;
        }
        let mut frame = f.clone();
        frame[6..12].copy_from_slice(&mac);
        set_tcp_checksum(&mut frame);
        send_frame(&fd, ifindex, &frame)?;
        sent += 1;
    }
    Ok(sent)
}

/// Write the TCP checksum of an IPv4 TCP frame ([`is_tcp_to`]'s kind).
///
/// Why: a frame the bridge hands to a veth usually carries no finished
/// TCP checksum. The sender's kernel left it to the device
/// (`CHECKSUM_PARTIAL`: only the pseudo-header's sum is in the field), and
/// a veth passes that promise on to the receiving namespace, which never
/// checks. A copy sent again from a packet socket has lost the promise, and
/// the job's kernel would drop it as corrupt (seen: the peer's own
/// retransmission was the one taken). A frame too short for its headers is
/// left as it is.
fn set_tcp_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame.get(ETH_HDR).map_or(0, |b| b & 0x0f)) * 4;
    let Some(total) = frame
        .get(ETH_HDR + 2..ETH_HDR + 4)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return;
    };
    let tcp = ETH_HDR + ihl;
    let end = ETH_HDR + total;
    if ihl < 20 || end > frame.len() || end < tcp + 20 {
        return;
    }
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for w in bytes.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            sum += hi | w.get(1).map_or(0, |&b| u32::from(b));
        }
    };
    add(&frame[ETH_HDR + 12..ETH_HDR + 20]); // source and destination
    add(&[0, IPPROTO_TCP]);
    add(&((end - tcp) as u16).to_be_bytes());
    frame[tcp + 16] = 0;
    frame[tcp + 17] = 0;
    add(&frame[tcp..end]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    frame[tcp + 16..tcp + 18].copy_from_slice(&check.to_be_bytes());
}

/// Send one whole Ethernet frame out of the link `ifindex`, to the MAC it
/// names.
fn send_frame(fd: &OwnedFd, ifindex: i32, frame: &[u8]) -> std::io::Result<()> {
    let mut dest = [0u8; 6];
    dest.copy_from_slice(&frame[..6]);
    jobnet::send_link_frame(fd, ifindex, ETH_P_IP.to_be(), dest, frame)
}

/// A link's index as `sockaddr_ll` wants it.
fn if_index(name: &str) -> std::io::Result<i32> {
    jobnet::link_index(name).map(|i| i as i32)
}

/// The MAC of `name`, asked of the kernel (SIOCGIFHWADDR) in the caller's
/// network namespace: `/sys/class/net` shows the namespace that mounted it.
fn read_mac(name: &str) -> std::io::Result<[u8; 6]> {
    let bytes = name.as_bytes();
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain socket(2); closed when `fd` drops.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame with a valid IPv4 header (a bridge that passes
    /// IPv4 to netfilter drops a malformed one) and 20 bytes after it.
    fn frame(dst: [u8; 4], proto: u8) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HDR + 40];
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let h = &mut f[ETH_HDR..ETH_HDR + 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&40u16.to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&[10, 9, 9, 1]);
        h[16..20].copy_from_slice(&dst);
        let sum: u32 = h
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        f
    }

    #[test]
    fn only_ipv4_tcp_to_the_job_is_kept() {
        let ip = Ipv4Addr::new(10, 77, 1, 20);
        assert!(is_tcp_to(&frame([10, 77, 1, 20], 6), ip));
        assert!(
            !is_tcp_to(&frame([10, 77, 1, 21], 6), ip),
            "another address"
        );
        assert!(!is_tcp_to(&frame([10, 77, 1, 20], 17), ip), "UDP");
        let mut arp = frame([10, 77, 1, 20], 6);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(!is_tcp_to(&arp, ip), "ARP");
        assert!(
            !is_tcp_to(&frame([10, 77, 1, 20], 6)[..30], ip),
            "cut short"
        );
    }

    /// The Internet checksum of an IPv4 TCP frame's segment with its
    /// pseudo-header: 0 when the checksum field is right.
    fn tcp_sum_of(frame: &[u8]) -> u16 {
        let tcp = ETH_HDR + 20;
        let mut words: Vec<u8> = frame[ETH_HDR + 12..ETH_HDR + 20].to_vec();
        words.extend_from_slice(&[0, 6]);
        words.extend_from_slice(&((frame.len() - tcp) as u16).to_be_bytes());
        words.extend_from_slice(&frame[tcp..]);
        if words.len() % 2 == 1 {
            words.push(0);
        }
        let mut sum: u32 = words
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn the_tcp_checksum_is_made_whole() {
        let mut f = frame([10, 77, 1, 20], 6);
        f[ETH_HDR + 20..].copy_from_slice(&[0x5a; 20]);
        f[ETH_HDR + 20 + 12] = 0x50; // data offset: 20 bytes
                                     // As a veth hands it over: only the pseudo-header's sum is there.
        f[ETH_HDR + 36..ETH_HDR + 38].copy_from_slice(&[0x12, 0x34]);
        assert_ne!(tcp_sum_of(&f), 0);
        set_tcp_checksum(&mut f);
        assert_eq!(
            tcp_sum_of(&f),
            0,
            "checksum field {:02x?}",
            &f[ETH_HDR + 36..ETH_HDR + 38]
        );
        // An odd length, and a frame cut short (left alone, no panic).
        let mut odd = frame([10, 77, 1, 20], 6);
        odd.push(0x77);
        odd[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&41u16.to_be_bytes());
        set_tcp_checksum(&mut odd);
        assert_eq!(tcp_sum_of(&odd), 0);
        let mut short = frame([10, 77, 1, 20], 6);
        short.truncate(ETH_HDR + 30);
        let before = short.clone();
        set_tcp_checksum(&mut short);
        assert_eq!(short, before);
    }

    /// Send one raw frame out of `link`.
    fn inject(link: &str, f: &[u8]) {
        send_frame(
            &jobnet::packet_socket(0).unwrap(),
            if_index(link).unwrap(),
            f,
        )
        .unwrap();
    }

    #[test]
    fn frames_held_during_a_freeze_reach_the_job_where_it_runs_now() {
        // A bridge with a peer's port and a job's veth, in a network
        // namespace of the test's own thread: the machine's links are never
        // touched.
        crate::agent::in_own_netns(|| {
            let ip = |args: &str| {
                let ok = std::process::Command::new("ip")
                    .args(args.split_whitespace())
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "ip {args}");
            };
            ip("link add rbr type bridge");
            ip("link set rbr up");
            for (host, other) in [("rpeer", "rpeerx"), ("rjob", "rjobx")] {
                ip(&format!("link add {host} type veth peer name {other}"));
                ip(&format!("link set {host} master rbr up"));
                ip(&format!("link set {other} up"));
            }
            let job = Ipv4Addr::new(10, 9, 9, 9);
            let mut tcp = frame([10, 9, 9, 9], 6);
            tcp[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x09]);
            tcp[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
            tcp[ETH_HDR + 20..].copy_from_slice(&[7u8; 20]);
            let mut udp = tcp.clone();
            udp[ETH_HDR + 9] = 17;

            // The freeze: the peer's frames reach the job's veth, and a copy
            // of the TCP one is kept; the veth's end ends the capture.
            let cap = Capture::start("rjob", job).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            inject("rpeerx", &tcp);
            inject("rpeerx", &udp);
            std::thread::sleep(Duration::from_millis(50));
            ip("link del rjob");
            let held = cap.finish();
            assert_eq!(held.len(), 1, "only the TCP frame to the job is kept");
            assert_eq!(held[0][ETH_HDR..], tcp[ETH_HDR..]);

            // The job runs again behind a new veth: the copy reaches it,
            // with the bridge's MAC as its source.
            ip("link add rjob2 type veth peer name rjob2x");
            ip("link set rjob2 master rbr up");
            ip("link set rjob2x up");
            let rx = jobnet::packet_socket(0).unwrap();
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = if_index("rjob2x").unwrap();
            // SAFETY: binds our own socket to a sockaddr_ll of its size.
            let r = unsafe {
                libc::bind(
                    rx.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0);
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(resend("rbr", &held).unwrap(), 1);
            let mut buf = vec![0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(2);
            let got = loop {
                // SAFETY: reads into our own buffer, with its length.
                let n = unsafe {
                    libc::recv(
                        rx.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 && is_tcp_to(&buf[..n as usize], job) {
                    break buf[..n as usize].to_vec();
                }
                assert!(Instant::now() < deadline, "the resent frame never came");
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(got[6..12], read_mac("rbr").unwrap(), "source MAC");
            assert_ne!(got[6..12], tcp[6..12], "never the peer's MAC");
            assert_eq!(got[ETH_HDR..ETH_HDR + 36], tcp[ETH_HDR..ETH_HDR + 36]);
            assert_eq!(got[ETH_HDR + 38..], tcp[ETH_HDR + 38..]);
            assert_eq!(tcp_sum_of(&got), 0, "a whole TCP checksum");
            assert_eq!(resend("rbr", &[]).unwrap(), 0);
            assert!(Capture::start("no-such-link", job).is_err());
        });
    }
}
