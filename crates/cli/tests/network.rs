//! End-to-end: a container on a network namespace made by the test with
//! `ip netns` and a veth pair (all traffic stays in namespaces the test made),
//! real guests under QEMU.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{env, text, wait_until};

const T: Duration = Duration::from_secs(90);

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().unwrap()
}

fn must(args: &[&str]) {
    let o = ip(args);
    assert!(o.status.success(), "ip {}: {}", args.join(" "), text(&o));
}

/// A network namespace with one end of a veth pair (`eth0`, `<net>.2/24`,
/// default route via `<net>.1`); the other end stays in the host namespace
/// with `<net>.1/24`. Removed on drop, even when the test fails.
struct TestNet {
    ns: String,
    host_veth: String,
    /// First three octets, e.g. "10.244.17".
    net: String,
    /// The IPv6 /64, e.g. "fd00:1a2b:0", when the pair has IPv6 addresses
    /// too (`<net6>::1` outside, `<net6>::2` inside, default route via `::1`).
    net6: Option<String>,
}

impl TestNet {
    fn new(tag: u8) -> TestNet {
        TestNet::build(tag, false)
    }

    /// Dual stack: IPv4 as [`TestNet::new`] plus an fd00::/8 /64.
    fn dual(tag: u8) -> TestNet {
        TestNet::build(tag, true)
    }

    fn build(tag: u8, v6: bool) -> TestNet {
        let pid = std::process::id();
        let n = TestNet {
            ns: format!("vessel-test-{pid}-{tag}"),
            host_veth: format!("vt{}h{tag}", pid % 100_000),
            net: format!("10.244.{}", (pid % 200) as u8 + tag),
            net6: v6.then(|| format!("fd00:{:x}:{tag:x}", pid % 0xffff)),
        };
        // Built first: a failing step below still removes what exists.
        n.setup();
        n
    }

    fn setup(&self) {
        let n = self;
        must(&["netns", "add", &n.ns]);
        must(&[
            "link",
            "add",
            &n.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &n.ns,
        ]);
        must(&[
            "addr",
            "add",
            &format!("{}.1/24", n.net),
            "dev",
            &n.host_veth,
        ]);
        must(&["link", "set", &n.host_veth, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["-n", &n.ns];
            a.extend_from_slice(args);
            must(&a);
        };
        inside(&["addr", "add", &format!("{}.2/24", n.net), "dev", "eth0"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["route", "add", "default", "via", &format!("{}.1", n.net)]);
        if let Some(net6) = &n.net6 {
            // nodad: usable at once (the guest's copy does its own DAD).
            must(&[
                "-6",
                "addr",
                "add",
                &format!("{net6}::1/64"),
                "dev",
                &n.host_veth,
                "nodad",
            ]);
            inside(&[
                "-6",
                "addr",
                "add",
                &format!("{net6}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            inside(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("{net6}::1"),
            ]);
        }
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.ns)
    }

    /// `ip -n <ns> <args>` output.
    fn show(&self, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["-n", &self.ns])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Waits up to `timeout` for the namespace to hold no `tap0_vessel`.
    fn tap_gone_within(&self, timeout: Duration) -> bool {
        wait_until(timeout, || !self.show(&["link"]).contains("tap0_vessel"))
    }

    /// `tc qdisc show` inside the namespace.
    fn qdiscs(&self) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.ns, "tc", "qdisc", "show"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_veth]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Kills a host helper process on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn set_netns(c: &mut serde_json::Value, path: Option<&str>) {
    let list = c["linux"]["namespaces"].as_array_mut().unwrap();
    list.retain(|n| n["type"] != "network");
    let mut ns = serde_json::json!({"type": "network"});
    if let Some(p) = path {
        ns["path"] = p.into();
    }
    list.push(ns);
}

/// [`host_get`] until it answers, within T.
fn host_get_within(url: &str) -> Option<String> {
    let mut got = None;
    wait_until(T, || {
        got = host_get(url);
        got.is_some()
    });
    got
}

fn host_get(url: &str) -> Option<String> {
    // curl: busybox-static's wget crashes (glibc static NSS).
    let o = Command::new("curl")
        .args(["-gsf", "-m", "3", url])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn http_both_ways_over_a_veth_namespace() {
    let Some(e) = env() else { return };
    let net = TestNet::new(0);
    let www = e.dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello-from-the-host\n").unwrap();
    let host_ip = format!("{}.1", net.net);
    let guest_ip = format!("{}.2", net.net);
    let _httpd = Reap(
        Command::new("busybox")
            .args(["httpd", "-f", "-p", &format!("{host_ip}:8080"), "-h"])
            .arg(&www)
            .spawn()
            .unwrap(),
    );
    let script = format!(
        "mkdir -p /www && echo hello-from-the-guest > /www/index.html && httpd -p 80 -h /www && \
         for i in $(seq 600); do \
           printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {host_ip} 8080 > /tmp/got 2>/dev/null; \
           if grep -q hello /tmp/got; then echo \"got: $(grep hello /tmp/got)\"; break; fi; \
           sleep 0.1; \
         done; ip addr show eth0; while :; do sleep 1; done"
    );
    let path = net.path();
    let b = e.bundle("b", &["sh", "-c", &script], |c| set_netns(c, Some(&path)));
    let (out, err) = e.create("net1", &b);
    // Wired at create: a tap inside the namespace, ingress qdiscs both ways.
    let links = net.show(&["link"]);
    assert!(
        links.contains("tap0_vessel"),
        "no tap in the netns: {links}"
    );
    assert!(
        net.qdiscs().matches("ingress").count() >= 2,
        "{}",
        net.qdiscs()
    );
    let host_links = String::from_utf8_lossy(&ip(&["link"]).stdout).into_owned();
    assert!(
        !host_links.contains("tap0_vessel"),
        "a tap leaked into the host namespace"
    );
    let o = e.run(&["start", "net1"]);
    assert!(o.status.success(), "{}", text(&o));
    // container -> host
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        wait_until(T, || read().contains("got: hello-from-the-host")),
        "container -> host HTTP failed; stdout: {}\nstderr: {}",
        read(),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    // The guest interface has the namespace's address.
    let inet = format!("inet {guest_ip}/24");
    assert!(wait_until(T, || read().contains(&inet)), "{}", read());
    // host -> container
    let url = format!("http://{guest_ip}:80/");
    let got = host_get_within(&url);
    assert!(
        got.is_some(),
        "host -> container HTTP failed; container stdout: {}",
        read()
    );
    assert_eq!(got.unwrap(), "hello-from-the-guest\n");
    let o = e.run(&["delete", "--force", "net1"]);
    assert!(o.status.success(), "{}", text(&o));
    e.assert_clean("net1");
    // Nothing of ours is left in the namespace.
    assert!(
        net.tap_gone_within(Duration::from_secs(10)),
        "tap left: {}",
        net.show(&["link"])
    );
    assert!(
        !net.qdiscs().contains("ingress"),
        "qdisc left: {}",
        net.qdiscs()
    );
}

#[test]
fn a_missing_namespace_path_is_a_clear_error() {
    let Some(e) = env() else { return };
    let path = format!("/var/run/netns/vessel-test-missing-{}", std::process::id());
    let b = e.bundle("b", &["true"], |c| set_netns(c, Some(&path)));
    let o = e.run(&["create", "--bundle", b.to_str().unwrap(), "nonet"]);
    assert!(!o.status.success(), "{}", text(&o));
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(msg.contains(&path), "error does not name the path: {msg}");
    e.assert_clean("nonet");
}

fn netns_inode(path: &str) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

#[test]
fn a_new_namespace_holds_the_container_pid_and_its_vmm_and_goes_with_delete() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["sh", "-c", "while :; do sleep 1; done"], |c| {
        set_netns(c, None)
    });
    e.create("nn1", &b);
    let state: serde_json::Value =
        serde_json::from_slice(&e.run(&["state", "nn1"]).stdout).unwrap();
    let pid = state["pid"].as_u64().unwrap();
    let ns = e.root.join("netns/nn1");
    let ns_ino = netns_inode(ns.to_str().unwrap());
    assert_ne!(ns_ino, netns_inode("/proc/self/ns/net"));
    assert_eq!(netns_inode(&format!("/proc/{pid}/ns/net")), ns_ino);
    // The task pid is the VMM's (or its jailer's): exactly one VMM process, the pid or
    // below it, in the namespace (virtiofsd sandboxes itself in a namespace of its own).
    let vmms = vessel_testutil::vmms_at_or_below(pid as u32);
    assert_eq!(
        vmms.len(),
        1,
        "VMM processes at or below the task pid {pid}: {vmms:?}"
    );
    for (p, comm) in &vmms {
        assert_eq!(
            netns_inode(&format!("/proc/{p}/ns/net")),
            ns_ino,
            "{p} {comm}"
        );
    }
    let o = e.run(&["delete", "--force", "nn1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!ns.exists(), "{} left", ns.display());
    e.assert_clean("nn1");
}

#[test]
fn loopback_only_without_a_namespace_path() {
    let Some(e) = env() else { return };
    let b = e.bundle(
        "b",
        &[
            "sh",
            "-c",
            "nc -l -p 7777 -e echo pong & \
             for i in $(seq 300); do \
               out=$(nc 127.0.0.1 7777 </dev/null 2>&1) && [ \"$out\" = pong ] && { echo $out; break; }; \
               sleep 0.1; \
             done; ip -o link",
        ],
        |c| set_netns(c, None),
    );
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "lo1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("pong\n"), "{}", text(&o));
    // Only loopback is up: the VM's spare NIC (for an interface added
    // between create and start) stays down and unconfigured.
    assert!(out.contains("lo: <LOOPBACK,UP"), "{out}");
    assert!(
        out.lines()
            .filter(|l| l.contains("link/ether"))
            .all(|l| !l.contains(",UP") && !l.contains("<UP")),
        "{out}"
    );
    e.assert_clean("lo1");
}

/// `tc filter show dev eth0 ingress` inside the namespace.
fn eth0_filters(net: &TestNet) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", &net.ns])
        .args(["tc", "filter", "show", "dev", "eth0", "ingress"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn delete_force_after_the_supervisor_was_killed_removes_its_tc_wiring() {
    let Some(e) = env() else { return };
    let net = TestNet::new(2);
    let path = net.path();
    let b = e.bundle("b", &["sh", "-c", "while :; do sleep 1; done"], |c| {
        set_netns(c, Some(&path))
    });
    e.create("killed1", &b);
    assert!(net.show(&["link"]).contains("tap0_vessel"));
    assert!(
        eth0_filters(&net).contains("mirred"),
        "{}",
        eth0_filters(&net)
    );
    let record = e.root.join("wired/killed1.json");
    assert!(record.exists(), "no wiring record at {record:?}");

    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.root.join("killed1/state.json")).unwrap()).unwrap();
    let supervisor = state["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // QEMU dies with it (PR_SET_PDEATHSIG), and the tap with the last fd;
    // the qdiscs on the namespace's own eth0 stay.
    assert!(
        net.tap_gone_within(Duration::from_secs(20)),
        "tap still there: {}",
        net.show(&["link"])
    );
    assert!(
        net.qdiscs().contains("ingress"),
        "nothing left to clean: {}",
        net.qdiscs()
    );

    let o = e.run(&["delete", "--force", "killed1"]);
    assert!(o.status.success(), "{}", text(&o));
    e.assert_clean("killed1");
    assert!(
        !net.qdiscs().contains("ingress"),
        "qdisc left: {}",
        net.qdiscs()
    );
    assert!(eth0_filters(&net).is_empty(), "{}", eth0_filters(&net));
    assert!(!record.exists(), "record left");
    // eth0 is the namespace owner's: still there, as it was.
    assert!(net.show(&["link"]).contains("eth0"));
}

#[test]
fn ipv6_addresses_and_default_route_reach_the_guest() {
    let Some(e) = env() else { return };
    let net = TestNet::dual(1);
    let net6 = net.net6.clone().unwrap();
    let (host_ip, guest_ip) = (format!("{net6}::1"), format!("{net6}::2"));
    let www = e.dir.path().join("www6");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello-over-ipv6\n").unwrap();
    let _httpd = Reap(
        Command::new("busybox")
            .args(["httpd", "-f", "-p", &format!("[{host_ip}]:8080"), "-h"])
            .arg(&www)
            .spawn()
            .unwrap(),
    );
    // container -> host over IPv6 (the default route's gateway), then the
    // guest's view of its addresses and IPv6 routes.
    let script = format!(
        "mkdir -p /www && echo hello-from-the-guest-v6 > /www/index.html && httpd -p '[::]:80' -h /www && \
         for i in $(seq 600); do \
           printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {host_ip} 8080 > /tmp/got 2>/dev/null; \
           if grep -q hello /tmp/got; then echo \"got: $(grep hello /tmp/got)\"; break; fi; \
           sleep 0.1; \
         done; ip -6 addr show eth0; ip -6 route; echo listed; while :; do sleep 1; done"
    );
    let path = net.path();
    let b = e.bundle("b", &["sh", "-c", &script], |c| set_netns(c, Some(&path)));
    let (out, err) = e.create("net6", &b);
    let o = e.run(&["start", "net6"]);
    assert!(o.status.success(), "{}", text(&o));
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        wait_until(T, || read().contains("got: hello-over-ipv6")),
        "container -> host HTTP over IPv6 failed; stdout: {}\nstderr: {}",
        read(),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    assert!(wait_until(T, || read().contains("listed")), "{}", read());
    let listing = read();
    assert!(
        listing.contains(&format!("inet6 {guest_ip}/64")),
        "the guest lacks the namespace's IPv6 address: {listing}"
    );
    assert!(
        listing.contains(&format!("default via {host_ip} dev eth0")),
        "the guest lacks the IPv6 default route: {listing}"
    );
    // host -> container over IPv6.
    let url = format!("http://[{guest_ip}]:80/");
    let got = host_get_within(&url);
    assert!(
        got.is_some(),
        "host -> container HTTP over IPv6 failed; container stdout: {}",
        read()
    );
    assert_eq!(got.unwrap(), "hello-from-the-guest-v6\n");
    let o = e.run(&["delete", "--force", "net6"]);
    assert!(o.status.success(), "{}", text(&o));
    e.assert_clean("net6");
    assert!(
        net.tap_gone_within(Duration::from_secs(10)),
        "tap left: {}",
        net.show(&["link"])
    );
}
