//! Escape monitoring of containers through seccomp user notification.
//!
//! The guest kernel has no audit subsystem, so SECCOMP_RET_LOG reports
//! nothing. Instead the agent rewrites each container's seccomp profile
//! ([`prepare`]) so that the syscalls it wants to see return
//! SECCOMP_RET_USER_NOTIF, with the OCI `listenerPath` naming the agent's
//! socket: libcontainer sends the notify fd there ([`serve`]; one per filter:
//! the container's init and each exec'd process load the profile), and the agent
//! answers each notification as the profile would have ([`Verdict`]) after
//! recording a security event in the [`crate::journal`]:
//! - every rule whose action is ERRNO (except ENOSYS ones, which answer
//!   probes for newer syscalls): the agent answers that errno, so a denial is
//!   still a denial, and reports `SECCOMP_DENIED` (`MODULE_LOAD`,
//!   `AGENT_PATH_MOUNT` for those syscalls);
//! - init_module, finit_module, mount and ptrace(PTRACE_ATTACH/SEIZE), when
//!   the profile has no rule of its own for them (a container without a
//!   profile gets one that allows everything else): answered as the default
//!   action would (errno, or "continue" for an allowing default). ptrace of
//!   the agent (guest pid 1, seen from the agent's pid namespace) is always
//!   denied.
//!
//! A default action cannot be a notification (libcontainer refuses it), so
//! denials by the default action of syscalls other than those above are not
//! seen. For allowed syscalls the agent inspects pointer arguments (mount
//! paths) after the fact: the check is a report, not a gate (the process
//! could change the strings after the agent read them).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libseccomp::ScmpSyscall;
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder, Spec,
};
use vessel_protocol::agent::security_event::Kind;

/// The agent's seccomp listener socket, in its working directory.
pub const SOCKET: &str = "seccomp.sock";
/// Largest container state message accepted from libcontainer.
const MAX_STATE: usize = 64 * 1024;
/// Longest string argument read from a process's memory.
const MAX_ARG: usize = 256;

const PTRACE_ATTACH: u64 = 16;
const PTRACE_SEIZE: u64 = 0x4206;

/// Syscalls watched even when the profile allows them.
const WATCHED: [&str; 4] = ["init_module", "finit_module", "mount", "ptrace"];

/// How the agent answers a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The profile denies the syscall with this errno.
    Errno(i32),
    /// The profile allows it: let the kernel run it.
    Continue,
}

/// Per syscall number, how a container's notifications are answered.
pub type Verdicts = HashMap<i32, Verdict>;

fn nr(name: &str) -> Option<i32> {
    ScmpSyscall::from_name(name).ok().map(i32::from)
}

fn notify_rule(name: &str, arg0: Option<u64>) -> LinuxSyscall {
    let mut b = LinuxSyscallBuilder::default()
        .names(vec![name.to_string()])
        .action(LinuxSeccompAction::ScmpActNotify);
    if let Some(value) = arg0 {
        let arg = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(value)
            .op(LinuxSeccompOperator::ScmpCmpEq)
            .build()
            .expect("index, value and op are set");
        b = b.args(vec![arg]);
    }
    b.build().expect("names and action are set")
}

/// Rewrites the spec's seccomp profile for monitoring (see the module
/// documentation) and returns how to answer its notifications; empty when
/// nothing is watched (then the spec is unchanged).
pub fn prepare(spec: &mut Spec, listener: &Path) -> Verdicts {
    let mut verdicts = Verdicts::new();
    let Some(linux) = spec.linux_mut() else {
        return verdicts;
    };
    let mut seccomp: LinuxSeccomp = match linux.seccomp() {
        Some(s) => s.clone(),
        None => LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .build()
            .expect("default action is set"),
    };
    let errno_default = |e: Option<u32>| e.map_or(libc::EPERM, |e| e as i32);
    let default = match seccomp.default_action() {
        LinuxSeccompAction::ScmpActAllow | LinuxSeccompAction::ScmpActLog => {
            Some(Verdict::Continue)
        }
        LinuxSeccompAction::ScmpActErrno => {
            Some(Verdict::Errno(errno_default(seccomp.default_errno_ret())))
        }
        // Kill, trap, trace: a notification would weaken or change them.
        _ => None,
    };
    let mut rules = seccomp.syscalls().clone().unwrap_or_default();
    let mut named = HashSet::new();
    for rule in rules.iter_mut() {
        named.extend(rule.names().iter().cloned());
        if rule.action() != LinuxSeccompAction::ScmpActErrno {
            continue;
        }
        let errno = errno_default(rule.errno_ret());
        // libcontainer itself writes after loading the filter.
        if errno == libc::ENOSYS || rule.names().iter().any(|n| n == "write") {
            continue;
        }
        let numbers: Vec<i32> = rule.names().iter().filter_map(|n| nr(n)).collect();
        if numbers.is_empty() {
            continue;
        }
        rule.set_action(LinuxSeccompAction::ScmpActNotify);
        for n in numbers {
            verdicts.entry(n).or_insert(Verdict::Errno(errno));
        }
    }
    if let Some(v) = default {
        for name in WATCHED {
            let Some(n) = nr(name) else { continue };
            if named.contains(name) {
                continue;
            }
            if name == "ptrace" {
                rules.push(notify_rule(name, Some(PTRACE_ATTACH)));
                rules.push(notify_rule(name, Some(PTRACE_SEIZE)));
            } else {
                rules.push(notify_rule(name, None));
            }
            verdicts.insert(n, v);
        }
    }
    if verdicts.is_empty() {
        return verdicts;
    }
    seccomp.set_syscalls(Some(rules));
    seccomp.set_listener_path(Some(listener.to_path_buf()));
    linux.set_seccomp(Some(seccomp));
    verdicts
}

/// The containers' verdicts, by container id.
#[derive(Default)]
pub struct Monitor {
    containers: Mutex<HashMap<String, Arc<Verdicts>>>,
}

impl Monitor {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Verdicts>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, id: &str, verdicts: Verdicts) {
        if !verdicts.is_empty() {
            self.lock().insert(id.to_string(), Arc::new(verdicts));
        }
    }

    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn verdicts(&self, id: &str) -> Option<Arc<Verdicts>> {
        self.lock().get(id).cloned()
    }
}

/// Accepts libcontainer's notify fds on `<work>/seccomp.sock` and serves them.
pub fn serve(monitor: Arc<Monitor>, work: &Path) -> std::io::Result<()> {
    let path = work.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    // libcontainer connects from the helper, which for an exec into a
    // container with a user namespace has joined it (and so is not root
    // here). Containers do not see the agent's directory.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    log::warn!("seccomp listener: accept: {e}");
                    continue;
                }
            };
            let monitor = monitor.clone();
            tokio::spawn(async move {
                match receive(stream).await {
                    Ok((id, fd)) => match monitor.verdicts(&id) {
                        Some(v) => {
                            log::debug!("container {id}: seccomp notify fd received");
                            spawn_notifications(id, fd, v)
                        }
                        None => log::warn!("seccomp notify fd for unknown container {id:?}"),
                    },
                    Err(e) => log::warn!("seccomp listener: {e}"),
                }
            });
        }
    });
    Ok(())
}

/// Reads the OCI container process state and the notify fd libcontainer sends.
async fn receive(stream: tokio::net::UnixStream) -> Result<(String, OwnedFd), String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut state = Vec::new();
    let mut fd: Option<OwnedFd> = None;
    let mut buf = vec![0u8; 8192];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        tokio::time::timeout_at(deadline, stream.readable())
            .await
            .map_err(|_| "no container state within 10s".to_string())?
            .map_err(|e| format!("wait for the container state: {e}"))?;
        let raw = stream.as_raw_fd();
        let got = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(RawFd);
            let msg = recvmsg::<()>(raw, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(r) = c {
                    fds.extend(r);
                }
            }
            Ok((msg.bytes, fds))
        });
        let (n, fds) = match got {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("receive the container state: {e}")),
        };
        for f in fds {
            // SAFETY: SCM_RIGHTS gave this process a new fd that nothing else owns.
            let f = unsafe { OwnedFd::from_raw_fd(f) };
            fd.get_or_insert(f);
        }
        if n == 0 {
            break;
        }
        state.extend_from_slice(&buf[..n]);
        if state.len() > MAX_STATE {
            return Err("container state larger than 64 KiB".into());
        }
    }
    let fd = fd.ok_or("no notify fd in the message")?;
    let v: serde_json::Value =
        serde_json::from_slice(&state).map_err(|e| format!("container state: {e}"))?;
    let id = v["state"]["id"]
        .as_str()
        .ok_or("container state without state.id")?
        .to_string();
    Ok((id, fd))
}

#[repr(C)]
#[derive(Default)]
struct SeccompData {
    nr: i32,
    arch: u32,
    instruction_pointer: u64,
    args: [u64; 6],
}

#[repr(C)]
#[derive(Default)]
struct SeccompNotif {
    id: u64,
    pid: u32,
    flags: u32,
    data: SeccompData,
}

#[repr(C)]
#[derive(Default)]
struct SeccompNotifResp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

/// _IOWR('!', 0, struct seccomp_notif)
const NOTIF_RECV: libc::c_ulong = 0xc050_2100;
/// _IOWR('!', 1, struct seccomp_notif_resp)
const NOTIF_SEND: libc::c_ulong = 0xc018_2101;
const USER_NOTIF_FLAG_CONTINUE: u32 = 1;

/// Answers the notifications of one filter, on a thread of its own, until no
/// process uses the filter. A thread, not a task: SECCOMP_IOCTL_NOTIF_RECV
/// blocks when no notification is pending, which must never hold one of the
/// agent's few runtime threads.
fn spawn_notifications(id: String, fd: OwnedFd, verdicts: Arc<Verdicts>) {
    let name = format!("seccomp-{}", id.chars().take(8).collect::<String>());
    let spawned = std::thread::Builder::new()
        .name(name)
        .spawn(move || notifications(&id, fd, &verdicts));
    if let Err(e) = spawned {
        log::warn!("no seccomp notifications served: {e}");
    }
}

fn notifications(id: &str, fd: OwnedFd, verdicts: &Verdicts) {
    let raw = fd.as_raw_fd();
    loop {
        let mut pfd = libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd it is given.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            log::warn!(
                "container {id}: seccomp notify poll: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if pfd.revents & libc::POLLIN == 0 {
            // POLLHUP: no process uses the filter any more.
            log::debug!("container {id}: seccomp notifications end");
            return;
        }
        let mut req = SeccompNotif::default();
        // SAFETY: NOTIF_RECV fills `req`, a zeroed struct seccomp_notif of the
        // size the ioctl number encodes.
        let rc = unsafe { libc::ioctl(raw, NOTIF_RECV, &mut req as *mut SeccompNotif) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // ENOENT: the process went away before we read its notification.
            if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINTR)) {
                continue;
            }
            log::warn!("container {id}: seccomp notify receive: {e}");
            return;
        }
        log::debug!(
            "container {id}: seccomp notification: syscall {} of pid {}",
            req.data.nr,
            req.pid
        );
        let verdict = handle(id, &req, verdicts);
        let mut resp = SeccompNotifResp {
            id: req.id,
            ..Default::default()
        };
        match verdict {
            Verdict::Continue => resp.flags = USER_NOTIF_FLAG_CONTINUE,
            Verdict::Errno(e) => resp.error = -e,
        }
        // SAFETY: NOTIF_SEND reads `resp`, a struct seccomp_notif_resp.
        let rc = unsafe { libc::ioctl(raw, NOTIF_SEND, &mut resp as *mut SeccompNotifResp) };
        if rc < 0 {
            // ENOENT: the process was killed meanwhile.
            log::debug!(
                "container {id}: seccomp answer: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Records what a notification shows and says how to answer it.
fn handle(id: &str, req: &SeccompNotif, verdicts: &Verdicts) -> Verdict {
    let nr = req.data.nr;
    let args = req.data.args;
    let verdict = verdicts
        .get(&nr)
        .copied()
        .unwrap_or(Verdict::Errno(libc::EPERM));
    let name = ScmpSyscall::from(nr)
        .get_name()
        .unwrap_or_else(|_| format!("syscall {nr}"));
    let denied = matches!(verdict, Verdict::Errno(_));
    let outcome = if denied { "denied" } else { "allowed" };
    let syscall = Some(nr as i64);
    if nr == libc::SYS_init_module as i32 || nr == libc::SYS_finit_module as i32 {
        report(
            Kind::MODULE_LOAD,
            id,
            syscall,
            format!("{name} ({outcome})"),
        );
        return verdict;
    }
    if nr == libc::SYS_mount as i32 {
        let pid = req.pid;
        let source = read_string(pid, args[0]);
        let target = read_string(pid, args[1]);
        let fstype = read_string(pid, args[2]);
        let detail = format!("mount {source:?} on {target:?} type {fstype:?} ({outcome})");
        if is_agent_mount(&source, &target, &fstype) {
            report(Kind::AGENT_PATH_MOUNT, id, syscall, detail);
        } else if denied {
            report(Kind::SECCOMP_DENIED, id, syscall, detail);
        }
        return verdict;
    }
    if nr == libc::SYS_ptrace as i32 {
        let attach = args[0] == PTRACE_ATTACH || args[0] == PTRACE_SEIZE;
        if attach && args[1] == 1 && in_agent_pid_ns(req.pid) {
            report(
                Kind::PTRACE_AGENT,
                id,
                syscall,
                "ptrace attach to the agent (pid 1), denied".into(),
            );
            return Verdict::Errno(libc::EPERM);
        }
        if denied {
            report(Kind::SECCOMP_DENIED, id, syscall, format!("{name} denied"));
        }
        return verdict;
    }
    if denied {
        report(Kind::SECCOMP_DENIED, id, syscall, format!("{name} denied"));
    }
    verdict
}

/// Records a security event for the host and logs it.
fn report(kind: Kind, id: &str, syscall: Option<i64>, detail: String) {
    log::warn!("container {id}: security event {kind:?}: {detail}");
    crate::journal::get().event(kind, id, syscall, detail);
}

/// A mount of the VM's shared file systems (the host's shares of every
/// container of the pod) or of the agent's own directory.
pub fn is_agent_mount(source: &str, target: &str, fstype: &str) -> bool {
    let agent = |p: &str| p.starts_with(crate::WORK_DIR);
    matches!(fstype, "virtiofs" | "9p") || agent(source) || agent(target)
}

fn in_agent_pid_ns(pid: u32) -> bool {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid"));
    let ours = std::fs::read_link("/proc/self/ns/pid");
    matches!((theirs, ours), (Ok(a), Ok(b)) if a == b)
}

/// A NUL-terminated string at `addr` in process `pid` (at most [`MAX_ARG`]
/// bytes, lossy UTF-8); "" if unreadable.
fn read_string(pid: u32, addr: u64) -> String {
    use std::os::unix::fs::FileExt;
    if addr == 0 {
        return String::new();
    }
    let path: PathBuf = format!("/proc/{pid}/mem").into();
    let Ok(f) = std::fs::File::open(path) else {
        return String::new();
    };
    let mut buf = vec![0u8; MAX_ARG];
    let n = f.read_at(&mut buf, addr).unwrap_or(0);
    let s = &buf[..n];
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seccomp: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion": "1.0.2", "root": {{"path": "/r"}},
                "process": {{"args": ["sh"], "cwd": "/", "user": {{"uid": 0, "gid": 0}}}},
                "linux": {{{seccomp}}}}}"#
        ))
        .unwrap()
    }

    fn actions(spec: &Spec) -> Vec<(String, LinuxSeccompAction)> {
        let s = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        s.syscalls()
            .iter()
            .flatten()
            .flat_map(|r| r.names().iter().map(move |n| (n.clone(), r.action())))
            .collect()
    }

    #[test]
    fn without_a_profile_the_watched_syscalls_notify_and_continue() {
        let mut s = spec("");
        let v = prepare(&mut s, Path::new("/run/vessel-agent/seccomp.sock"));
        assert_eq!(
            v.get(&(libc::SYS_finit_module as i32)),
            Some(&Verdict::Continue)
        );
        assert_eq!(v.get(&(libc::SYS_ptrace as i32)), Some(&Verdict::Continue));
        let sc = s.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert_eq!(sc.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert_eq!(
            sc.listener_path().as_deref(),
            Some(Path::new("/run/vessel-agent/seccomp.sock"))
        );
        // Two conditional ptrace rules (attach, seize), one for each other.
        assert_eq!(actions(&s).len(), 5);
        assert!(actions(&s)
            .iter()
            .all(|(_, a)| *a == LinuxSeccompAction::ScmpActNotify));
    }

    #[test]
    fn errno_rules_notify_with_their_errno_and_enosys_and_write_rules_stay() {
        let mut s = spec(
            r#""seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
                "syscalls": [
                    {"names": ["read", "write", "exit"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22},
                    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                    {"names": ["write"], "action": "SCMP_ACT_ERRNO"},
                    {"names": ["mount"], "action": "SCMP_ACT_ALLOW"}
                ]}"#,
        );
        let v = prepare(&mut s, Path::new("/l"));
        assert_eq!(
            v.get(&(libc::SYS_personality as i32)),
            Some(&Verdict::Errno(22))
        );
        assert_eq!(v.get(&(libc::SYS_clone3 as i32)), None);
        assert_eq!(v.get(&(libc::SYS_write as i32)), None);
        // Not named: answered as the default (EPERM) would.
        assert_eq!(
            v.get(&(libc::SYS_init_module as i32)),
            Some(&Verdict::Errno(1))
        );
        // Named by the profile (allowed): left alone.
        assert_eq!(v.get(&(libc::SYS_mount as i32)), None);
        let a = actions(&s);
        assert!(a.contains(&("clone3".into(), LinuxSeccompAction::ScmpActErrno)));
        assert!(a.contains(&("personality".into(), LinuxSeccompAction::ScmpActNotify)));
    }

    #[test]
    fn a_killing_default_gets_no_added_rules() {
        let mut s = spec(r#""seccomp": {"defaultAction": "SCMP_ACT_KILL"}"#);
        assert!(prepare(&mut s, Path::new("/l")).is_empty());
        let sc = s.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert!(sc.listener_path().is_none());
    }

    #[test]
    fn shared_file_systems_and_agent_paths_are_agent_mounts() {
        assert!(is_agent_mount("rootfs0", "/mnt", "virtiofs"));
        assert!(is_agent_mount("x", "/mnt", "9p"));
        assert!(is_agent_mount("/run/vessel-agent", "/mnt", ""));
        assert!(!is_agent_mount("tmpfs", "/mnt", "tmpfs"));
    }
}
