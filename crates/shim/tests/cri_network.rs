//! CRI pods on a real CNI network: Debian's containernetworking-plugins
//! (bridge, host-local, loopback, portmap) in this containerd's private CNI
//! directories. A pod gets the address the bridge plugin gave it, serves HTTP
//! on it to the host, pods on one bridge reach each other, and once the pods
//! are removed no tap, tc qdisc or filter, veth or namespace is left.

mod common;

use std::time::Duration;

use common::cri::*;
use common::{host_get, test_net, wait_until, Containerd, PodNetns};

const T: Duration = Duration::from_secs(120);

/// A pod on the CNI network, logging in the containerd's directory.
fn pod_on_cni(name: &str, c: &Containerd) -> PodSandboxConfig {
    common::cri::pod_on_cni(name, &c.dir.path().join("logs"))
}

/// The pod's IP in PodSandboxStatus (filled by containerd from CNI's result).
async fn pod_ip(rt: &mut Runtime, pod: &str) -> String {
    rt.pod_sandbox_status(PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .expect("PodSandboxStatus")
    .into_inner()
    .status
    .and_then(|s| s.network)
    .map(|n| n.ip)
    .unwrap_or_default()
}

/// busybox httpd in the foreground serving `body` at `/`.
fn httpd(body: &str) -> Vec<String> {
    let script =
        format!("mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 80 -h /www");
    ["sh", "-c", &script].map(String::from).to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_pods_on_a_cni_bridge_get_its_addresses_serve_the_host_and_reach_each_other() {
    let Some(c) = Containerd::start() else { return };
    let (net, bridge) = test_net(20);
    let br = c.real_cni("vessel-cri", &bridge, &net);
    let mut rt = connect(&c.sock).await;
    wait_network_ready(&mut rt).await;

    let mut pods = Vec::new();
    for name in ["web-a", "web-b"] {
        let cfg = pod_on_cni(name, &c);
        let pod = run_pod(&mut rt, &cfg).await;
        let ip = pod_ip(&mut rt, &pod).await;
        eprintln!("pod {name} ({pod}): {ip}");
        assert!(
            ip.starts_with(&format!("{net}.")),
            "pod {name}: PodSandboxStatus ip {ip:?} is not from the bridge's subnet {net}.0/24"
        );
        let body = format!("hello-from-{name}");
        let refs: Vec<String> = httpd(&body);
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let ctr = start_container(&mut rt, &pod, &cfg, "httpd", &refs).await;
        pods.push((pod, ip, ctr, body));
    }
    let [(pod_a, ip_a, ctr_a, body_a), (pod_b, ip_b, ctr_b, body_b)] = &pods[..] else {
        unreachable!()
    };
    assert_ne!(ip_a, ip_b);

    // The guest has the address CNI gave the pod.
    let (code, addrs) = exec(&mut rt, ctr_a, &["ip", "-o", "-4", "addr"]).await;
    assert_eq!(code, 0);
    assert!(
        addrs.contains(&format!("inet {ip_a}/24")),
        "guest addresses of pod a: {addrs}"
    );

    // The sandbox task's pid is the VMM, in the pod's namespace, where the
    // runtime wired CNI's eth0 to a tap with tc redirects both ways.
    let held: Vec<PodNetns> = [pod_a, pod_b]
        .iter()
        .map(|pod| PodNetns::hold(&c, &c.task_pid("k8s.io", pod)))
        .collect();
    for ns in &held {
        assert!(ns.links().contains("tap0_vessel"), "{}", ns.links());
        assert!(
            ns.qdiscs().matches("ingress").count() >= 2,
            "{}",
            ns.qdiscs()
        );
        assert!(
            ns.filters("eth0").contains("mirred"),
            "{}",
            ns.filters("eth0")
        );
    }

    // Each guest NIC has its own pod's MAC (CNI's eth0's), also the second pod's,
    // which is a clone of a template made from the first (docs/snapshots.md): its
    // device kept the template's MAC until the agent gave it its own. Two guests
    // with one MAC on one bridge would break the bridge's forwarding.
    let mut macs = Vec::new();
    for (ctr, ns) in [ctr_a, ctr_b].into_iter().zip(&held) {
        let (code, mac) = exec(&mut rt, ctr, &["cat", "/sys/class/net/eth0/address"]).await;
        assert_eq!(code, 0, "{mac}");
        let mac = mac.trim().to_string();
        assert!(
            ns.links().contains(&format!("link/ether {mac} ")),
            "guest MAC {mac} is not its pod's eth0's: {}",
            ns.links()
        );
        macs.push(mac);
    }
    assert_ne!(macs[0], macs[1], "two pods' guests share a MAC");

    // Host -> pod over the bridge.
    for (ip, body) in [(ip_a, body_a), (ip_b, body_b)] {
        let url = format!("http://{ip}/");
        let mut got = None;
        assert!(
            wait_until(T, || {
                got = host_get(&url);
                got.is_some()
            }),
            "host -> pod {url} failed; {}",
            c.log_tail()
        );
        assert_eq!(got.unwrap().trim(), body);
    }
    // Pod -> pod on the same bridge, both ways (nc: busybox-static's wget
    // crashes in glibc's static NSS).
    for (from, ip, body) in [(ctr_b, ip_a, body_a), (ctr_a, ip_b, body_b)] {
        let get = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip} 80");
        let (code, got) = exec(&mut rt, from, &["sh", "-c", &get]).await;
        assert_eq!(code, 0, "{from} -> {ip}: {got}");
        assert!(
            got.starts_with("HTTP/1.1 200") && got.trim_end().ends_with(body.as_str()),
            "{from} -> {ip}: {got}"
        );
    }

    let sockets = shim_sockets(&c);
    for (pod, ..) in &pods {
        stop_and_remove(&mut rt, pod).await;
    }
    assert_nothing_left(&c, &sockets);
    assert!(
        wait_until(Duration::from_secs(15), || br.ports().is_empty()),
        "veths left on {bridge}: {}",
        br.ports()
    );
    for ns in held {
        ns.assert_empty();
    }
}

/// The seed's yardstick: nginx built from Debian's `nginx` package
/// (tests/support/nginx-image.sh) in a CRI pod with runtime handler `vessel`
/// serves its page to the host on the pod IP the bridge plugin gave it.
/// docs/example-nginx-cri.md walks through the same steps by hand.
#[tokio::test(flavor = "multi_thread")]
async fn nginx_from_debian_in_a_vessel_pod_serves_its_page_on_the_pod_ip() {
    let Some(c) = Containerd::start() else { return };
    let image = nginx_image();
    let import = c.ctr_ns(
        "k8s.io",
        &["images", "import", &image.display().to_string()],
    );
    assert!(import.status.success(), "import {image:?}");
    let (net, bridge) = test_net(22);
    let br = c.real_cni("vessel-nginx", &bridge, &net);
    let mut rt = connect(&c.sock).await;
    wait_network_ready(&mut rt).await;

    let cfg = pod_on_cni("nginx", &c);
    let pod = run_pod(&mut rt, &cfg).await;
    let ip = pod_ip(&mut rt, &pod).await;
    eprintln!("nginx pod {pod}: {ip}");
    assert!(ip.starts_with(&format!("{net}.")), "pod ip {ip:?}");
    let config = ContainerConfig {
        image: Some(ImageSpec {
            image: NGINX.into(),
            ..Default::default()
        }),
        // The image's entrypoint and cmd: nginx -g 'daemon off;'. Its
        // own pid namespace, as kubelet asks by default.
        ..container_config_pid("nginx", &[], NamespaceMode::Container)
    };
    let nginx = start(&mut rt, &pod, &cfg, config).await;
    let held = PodNetns::hold(&c, &c.task_pid("k8s.io", &pod));

    let url = format!("http://{ip}/");
    let mut page = None;
    assert!(
        wait_until(T, || {
            page = host_get(&url);
            page.is_some()
        }),
        "host -> nginx {url} failed: {:?}; {}",
        status(&mut rt, &nginx).await,
        c.log_tail()
    );
    let page = page.unwrap();
    assert!(
        page.contains("<title>Welcome to nginx!</title>"),
        "not Debian's nginx page: {page}"
    );

    let sockets = shim_sockets(&c);
    stop_and_remove(&mut rt, &pod).await;
    assert_nothing_left(&c, &sockets);
    assert!(
        wait_until(Duration::from_secs(15), || br.ports().is_empty()),
        "veths left on {bridge}: {}",
        br.ports()
    );
    held.assert_empty();
}

const NGINX: &str = "localhost/vessel-nginx:latest";

/// Builds (once, cached beside the busybox image) the nginx image.
fn nginx_image() -> std::path::PathBuf {
    let out =
        std::process::Command::new(vessel_testutil::repo().join("tests/support/nginx-image.sh"))
            .arg(vessel_testutil::image_dir())
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "nginx-image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().into()
}
