//! virtio-net against a real tap device: the tiny guest sends a frame, the test captures it
//! on the host side of the tap with a packet socket and answers; the guest prints the answer.
//! Needs /dev/kvm, /dev/net/tun and CAP_NET_ADMIN (skips loudly otherwise).

mod common;

use std::time::Duration;

use common::*;

const ETH_P_EXP: u16 = 0x88b5;

fn if_up(name: &str) -> std::io::Result<i32> {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a 40-byte ifreq with the name set; SIOCGIFFLAGS fills the flags.
    let mut r = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, req.as_mut_ptr()) };
    if r == 0 {
        let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: same ifreq, now with IFF_UP set.
        r = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, req.as_mut_ptr()) };
    }
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(fd) };
    // Only an interface that is up: a packet socket bound to a down one fails its first
    // recv with ENETDOWN (the tap can appear between a failed SIOCGIFFLAGS and the ifindex
    // read).
    if r != 0 {
        return Err(err);
    }
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no ifindex"))
}

#[test]
fn guest_frame_reaches_the_tap_and_a_reply_comes_back() {
    if !kvm_available("guest_frame_reaches_the_tap_and_a_reply_comes_back") {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("\n*** SKIPPED net tap test: no /dev/net/tun ***\n");
        return;
    }
    let tap = format!("vvt{}", std::process::id() % 100000);
    let dir = scratch("net");
    let log = dir.path().join("serial.log");
    let child = spawn(&[
        "--kernel",
        tiny_guest().to_str().unwrap(),
        "--cmdline",
        "mode=net",
        "--net",
        &format!("{tap},mac=02:aa:bb:cc:dd:ee"),
        "--serial-log",
        log.to_str().unwrap(),
    ]);
    let mut child = Guard(child);
    let ifindex = poll(Duration::from_secs(10), || if_up(&tap).ok());
    let Some(ifindex) = ifindex else {
        let status = child.0.try_wait().unwrap();
        eprintln!(
            "\n*** SKIPPED net tap test: tap {tap} was not created (no CAP_NET_ADMIN?), VMM status {status:?} ***\n"
        );
        return;
    };
    // SAFETY: plain socket(2) call for a packet socket on our ethertype.
    let sock = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_EXP.to_be()),
        )
    };
    assert!(
        sock >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_EXP.to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: `addr` is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            sock,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 60,
        tv_usec: 0,
    };
    // SAFETY: setting a receive timeout with a valid timeval.
    unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let mut frame = [0u8; 2048];
    // SAFETY: receiving into a buffer we own, of the length given.
    let n = unsafe { libc::recv(sock, frame.as_mut_ptr().cast(), frame.len(), 0) };
    assert!(
        n > 0,
        "no frame from the guest: {}",
        std::io::Error::last_os_error()
    );
    let frame = &frame[..n as usize];
    assert_eq!(
        &frame[6..12],
        &[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
        "source MAC"
    );
    assert_eq!(&frame[14..34], b"hello-from-guest-net");
    let mut reply = Vec::new();
    reply.extend_from_slice(&frame[6..12]);
    reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    reply.extend_from_slice(&ETH_P_EXP.to_be_bytes());
    reply.extend_from_slice(b"reply-from-host-tap!");
    reply.resize(60, 0);
    // SAFETY: sending a buffer we own.
    let sent = unsafe { libc::send(sock, reply.as_ptr().cast(), reply.len(), 0) };
    assert_eq!(sent, reply.len() as isize);
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(60)).code(),
        Some(0)
    );
    wait_for_text(&log, "NET-RX reply-from-host-tap!", Duration::from_secs(5));
    // SAFETY: closing our socket.
    unsafe { libc::close(sock) };
}
