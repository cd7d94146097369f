//! The command line and its validation into a [`JailSpec`]. Pure: nothing here touches
//! the file system except [`JailSpec::check_host`].

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use clap::Parser;

/// Where jails live unless `--jail-root` says otherwise.
pub const DEFAULT_JAIL_ROOT: &str = "/srv/vessel/jail";

/// The environment variables passed through to the VMM; everything else is cleared.
pub const ENV_ALLOW_LIST: &[&str] = &["VESSEL_VMM_LOG"];

/// In-jail paths the jailer fills itself; a bind may not land on or under them.
const RESERVED: &[&str] = &["/dev"];

/// `vessel-jailer`: starts one vessel-vmm confined (see docs/vmm.md, "Jailer").
#[derive(Debug, Parser)]
#[command(
    name = "vessel-jailer",
    version,
    about = "Starts one vessel-vmm confined: own mount namespace with pivot_root into \
             <jail-root>/<id>/root, cgroup vessel/<id>, rlimits, no new privileges, \
             unprivileged uid/gid",
    after_help = "The VMM arguments after `--` must already use in-jail paths. If a jailer \
                  was SIGKILLed, the next start of the same id removes its stale jail \
                  directory and cgroup first."
)]
pub struct Cli {
    /// VM id: 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit. Names the jail and cgroup.
    #[arg(long)]
    pub id: String,
    /// The VMM binary on the host; bind-mounted read-only at /<file name> in the jail.
    #[arg(long)]
    pub exec: PathBuf,
    /// User id the VMM runs as (not 0 unless --allow-root).
    #[arg(long)]
    pub uid: u32,
    /// Group id the VMM runs as (not 0 unless --allow-root).
    #[arg(long)]
    pub gid: u32,
    /// Allow uid or gid 0 (tests of the jail itself only).
    #[arg(long)]
    pub allow_root: bool,
    /// Directory holding one `<id>/root` jail per VM.
    #[arg(long, default_value = DEFAULT_JAIL_ROOT)]
    pub jail_root: PathBuf,
    /// Bind a host file or directory read-only into the jail (repeatable).
    #[arg(long = "ro-bind", value_name = "HOST:JAIL", value_parser = parse_bind)]
    pub ro_bind: Vec<Bind>,
    /// The one read-write host directory (the run dir: sockets, serial log). The jailer
    /// makes it owned by --uid/--gid so that the VMM can create its sockets there.
    #[arg(long = "rw-bind", value_name = "HOST:JAIL", value_parser = parse_bind)]
    pub rw_bind: Option<Bind>,
    /// Join this network namespace (a file such as /var/run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Start the VMM in a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Stay in the cgroup the jailer was started in (vessel-runtime starts it in the
    /// sandbox's, which holds every host process of the sandbox) instead of vessel/<id>.
    #[arg(long, conflicts_with_all = ["cgroup_mem_mib", "cgroup_cpus"])]
    pub no_cgroup: bool,
    /// cgroup memory limit in MiB.
    #[arg(long)]
    pub cgroup_mem_mib: Option<u64>,
    /// cgroup CPU limit in CPUs (fractions allowed, e.g. 1.5).
    #[arg(long)]
    pub cgroup_cpus: Option<f64>,
    /// RLIMIT_NOFILE (soft and hard) for the VMM.
    #[arg(long)]
    pub rlimit_nofile: Option<u64>,
    /// RLIMIT_FSIZE in bytes (soft and hard) for the VMM.
    #[arg(long)]
    pub rlimit_fsize: Option<u64>,
    /// Create /dev/net/tun in the jail (for --net tap devices).
    #[arg(long)]
    pub tun: bool,
    /// An open descriptor the VMM inherits under the same number (repeatable; 3 or above),
    /// such as a tap the runtime opened in the sandbox's network namespace. Every other
    /// descriptor is closed before the VMM starts.
    #[arg(long = "keep-fd", value_name = "FD")]
    pub keep_fd: Vec<i32>,
    /// Stop the VMM and clean up when the jailer's parent dies (a SIGTERM to the jailer
    /// as parent-death signal), instead of keeping it running.
    #[arg(long)]
    pub die_with_parent: bool,
    /// Arguments for the VMM, using in-jail paths.
    #[arg(last = true, value_name = "VMM ARGS")]
    pub vmm_args: Vec<OsString>,
}

/// A bind mount: a host path shown at an in-jail path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Path on the host.
    pub host: PathBuf,
    /// Absolute, normalized path inside the jail.
    pub jail: PathBuf,
}

/// Why the command line cannot be used.
#[derive(Debug, PartialEq, thiserror::Error, displaydoc::Display)]
pub enum SpecError {
    /// invalid id {0:?}: use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit
    BadId(String),
    /// refusing to run the VMM as uid {uid} gid {gid}: give unprivileged ids (or --allow-root)
    Root { uid: u32, gid: u32 },
    /// bind {0:?}: expected HOST:JAIL with both paths absolute
    BadBind(String),
    /// in-jail path {0:?} must be absolute, without `..`, and not `/`
    BadJailPath(PathBuf),
    /// in-jail path {0:?} is reserved for the jailer (it fills /dev and the VMM binary itself)
    Reserved(PathBuf),
    /// in-jail paths {0:?} and {1:?} overlap: each bind needs its own place
    Overlap(PathBuf, PathBuf),
    /// --exec {0:?}: give the absolute path of the VMM binary
    BadExec(PathBuf),
    /// --jail-root {0:?} must be an absolute path
    BadJailRoot(PathBuf),
    /// --cgroup-cpus {0} must be a number of CPUs above 0 (at most 4096)
    BadCpus(f64),
    /// --{0} must be above 0
    Zero(&'static str),
    /// --keep-fd {0}: give each descriptor once, 3 or above (0-2 are the VMM's stdio)
    BadKeepFd(i32),
    /// --keep-fd {0} is not an open descriptor of the jailer
    ClosedKeepFd(i32),
    /// {what} {path:?} does not exist or is not usable: {detail}
    Missing {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
}

/// A validated jail request.
#[derive(Debug, Clone, PartialEq)]
pub struct JailSpec {
    pub id: String,
    pub exec: PathBuf,
    /// Where the VMM binary appears in the jail: `/<file name of exec>`.
    pub exec_in_jail: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub jail_root: PathBuf,
    pub ro_binds: Vec<Bind>,
    pub rw_bind: Option<Bind>,
    pub netns: Option<PathBuf>,
    pub new_pid_ns: bool,
    /// The limits of cgroup vessel/<id>; `None`: no cgroup of its own (`--no-cgroup`).
    pub limits: Option<crate::cgroup::Limits>,
    pub rlimit_nofile: Option<u64>,
    pub rlimit_fsize: Option<u64>,
    pub tun: bool,
    /// Descriptors the VMM inherits.
    pub keep_fds: Vec<i32>,
    pub die_with_parent: bool,
    pub vmm_args: Vec<OsString>,
}

impl JailSpec {
    /// Validates the command line without looking at the host.
    pub fn from_cli(cli: Cli) -> Result<JailSpec, SpecError> {
        validate_id(&cli.id)?;
        if (cli.uid == 0 || cli.gid == 0) && !cli.allow_root {
            return Err(SpecError::Root {
                uid: cli.uid,
                gid: cli.gid,
            });
        }
        let exec_name = match (cli.exec.is_absolute(), cli.exec.file_name()) {
            (true, Some(name)) => name.to_owned(),
            _ => return Err(SpecError::BadExec(cli.exec)),
        };
        if !cli.jail_root.is_absolute() {
            return Err(SpecError::BadJailRoot(cli.jail_root));
        }
        if let Some(cpus) = cli.cgroup_cpus {
            if !(cpus.is_finite() && cpus > 0.0 && cpus <= 4096.0) {
                return Err(SpecError::BadCpus(cpus));
            }
        }
        for (name, v) in [
            ("cgroup-mem-mib", cli.cgroup_mem_mib),
            ("rlimit-nofile", cli.rlimit_nofile),
            ("rlimit-fsize", cli.rlimit_fsize),
        ] {
            if v == Some(0) {
                return Err(SpecError::Zero(name));
            }
        }
        for (i, fd) in cli.keep_fd.iter().enumerate() {
            if *fd < 3 || cli.keep_fd[..i].contains(fd) {
                return Err(SpecError::BadKeepFd(*fd));
            }
        }
        let exec_in_jail = Path::new("/").join(exec_name);
        let mut taken = reserved(&exec_in_jail);
        for b in cli.ro_bind.iter().chain(cli.rw_bind.iter()) {
            claim(&mut taken, &b.jail)?;
        }
        Ok(JailSpec {
            id: cli.id,
            exec: cli.exec,
            exec_in_jail,
            uid: cli.uid,
            gid: cli.gid,
            jail_root: cli.jail_root,
            ro_binds: cli.ro_bind,
            rw_bind: cli.rw_bind,
            netns: cli.netns,
            new_pid_ns: cli.new_pid_ns,
            limits: (!cli.no_cgroup).then_some(crate::cgroup::Limits {
                mem_mib: cli.cgroup_mem_mib,
                cpus: cli.cgroup_cpus,
                pids: None,
            }),
            rlimit_nofile: cli.rlimit_nofile,
            rlimit_fsize: cli.rlimit_fsize,
            tun: cli.tun,
            keep_fds: cli.keep_fd,
            die_with_parent: cli.die_with_parent,
            vmm_args: cli.vmm_args,
        })
    }

    /// `<jail_root>/<id>`: the jail's lock file and its `root`.
    pub fn jail_dir(&self) -> PathBuf {
        self.jail_root.join(&self.id)
    }

    /// `<jail_root>/<id>/root`: what the VMM sees as `/`.
    pub fn root_dir(&self) -> PathBuf {
        self.jail_dir().join("root")
    }

    /// The in-jail paths taken: /dev, the VMM binary, the binds.
    pub(crate) fn jail_paths_in_use(&self) -> Vec<PathBuf> {
        let mut taken = reserved(&self.exec_in_jail);
        taken.extend(
            self.ro_binds
                .iter()
                .chain(&self.rw_bind)
                .map(|b| b.jail.clone()),
        );
        taken
    }

    /// Checks that everything named on the host exists, before anything is created.
    pub fn check_host(&self) -> Result<(), SpecError> {
        let missing = |what, path: &Path, detail: String| SpecError::Missing {
            what,
            path: path.to_owned(),
            detail,
        };
        match std::fs::metadata(&self.exec) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(missing("--exec", &self.exec, "not a file".into())),
            Err(e) => return Err(missing("--exec", &self.exec, e.to_string())),
        }
        for b in &self.ro_binds {
            if let Err(e) = std::fs::metadata(&b.host) {
                return Err(missing("--ro-bind source", &b.host, e.to_string()));
            }
        }
        if let Some(b) = &self.rw_bind {
            match std::fs::metadata(&b.host) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(missing(
                        "--rw-bind source",
                        &b.host,
                        "not a directory".into(),
                    ))
                }
                Err(e) => return Err(missing("--rw-bind source", &b.host, e.to_string())),
            }
        }
        if let Some(ns) = &self.netns {
            if let Err(e) = std::fs::metadata(ns) {
                return Err(missing("--netns", ns, e.to_string()));
            }
        }
        for fd in &self.keep_fds {
            if nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
                return Err(SpecError::ClosedKeepFd(*fd));
            }
        }
        Ok(())
    }
}

/// Checks an id with the runtime's one id rule (`vessel_protocol::id`, copied
/// here to keep the jailer free of dependencies; a test holds the copy to the
/// same cases): it becomes a directory and a cgroup name.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    let b = id.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadId(id.to_string()))
    }
}

/// Parses `HOST:JAIL` (split at the last `:`, so host paths may contain one).
pub fn parse_bind(s: &str) -> Result<Bind, SpecError> {
    let (host, jail) = s
        .rsplit_once(':')
        .ok_or_else(|| SpecError::BadBind(s.to_string()))?;
    let host = PathBuf::from(host);
    if !host.is_absolute() {
        return Err(SpecError::BadBind(s.to_string()));
    }
    Ok(Bind {
        host,
        jail: jail_path(Path::new(jail))?,
    })
}

/// Checks an in-jail path: absolute, no `..`, not `/`; returns it normalized.
pub fn jail_path(p: &Path) -> Result<PathBuf, SpecError> {
    let mut comps = p.components();
    let rooted = comps.next() == Some(Component::RootDir);
    let normal = comps.clone().all(|c| matches!(c, Component::Normal(_)));
    if !rooted || !normal || comps.next().is_none() {
        return Err(SpecError::BadJailPath(p.to_owned()));
    }
    // Components drop `.`, duplicate and trailing slashes: `/a/.//b/` becomes `/a/b`.
    Ok(p.components().collect())
}

/// The host path of `in_jail` inside the jail rooted at `root` (`root` + `in_jail`).
/// `in_jail` must have passed [`jail_path`].
pub fn host_path(root: &Path, in_jail: &Path) -> PathBuf {
    root.join(in_jail.strip_prefix("/").unwrap_or(in_jail))
}

/// The in-jail paths the jailer fills itself.
fn reserved(exec_in_jail: &Path) -> Vec<PathBuf> {
    let mut taken: Vec<PathBuf> = RESERVED.iter().map(PathBuf::from).collect();
    taken.push(exec_in_jail.to_owned());
    taken
}

/// Adds `p` to the in-jail paths in use, refusing overlaps (equal, or one inside the other).
pub(crate) fn claim(taken: &mut Vec<PathBuf>, p: &Path) -> Result<(), SpecError> {
    for t in taken.iter() {
        if p.starts_with(t) || t.starts_with(p) {
            return Err(if RESERVED.iter().any(|r| t == Path::new(r)) {
                SpecError::Reserved(p.to_owned())
            } else {
                SpecError::Overlap(t.clone(), p.to_owned())
            });
        }
    }
    taken.push(p.to_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(extra: &[&str]) -> Result<JailSpec, String> {
        let mut argv = vec![
            "vessel-jailer",
            "--id",
            "vm-1",
            "--exec",
            "/usr/local/bin/vessel-vmm",
            "--uid",
            "65534",
            "--gid",
            "65534",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        JailSpec::from_cli(cli).map_err(|e| e.to_string())
    }

    #[test]
    fn full_command_line() {
        let s = cli(&[
            "--jail-root",
            "/j",
            "--ro-bind",
            "/boot/vmlinux:/vmlinux",
            "--ro-bind",
            "/var/lib/x/sha256:abc:/snap/",
            "--rw-bind",
            "/run/vessel/vm-1:/run",
            "--netns",
            "/var/run/netns/n",
            "--new-pid-ns",
            "--cgroup-mem-mib",
            "256",
            "--cgroup-cpus",
            "1.5",
            "--rlimit-nofile",
            "1024",
            "--rlimit-fsize",
            "1000000",
            "--tun",
            "--die-with-parent",
            "--",
            "--kernel",
            "/vmlinux",
        ])
        .unwrap();
        assert_eq!(s.exec_in_jail, Path::new("/vessel-vmm"));
        assert_eq!(s.root_dir(), Path::new("/j/vm-1/root"));
        assert_eq!(
            s.ro_binds[1],
            Bind {
                host: "/var/lib/x/sha256:abc".into(),
                jail: "/snap".into()
            }
        );
        assert_eq!(s.rw_bind.unwrap().jail, Path::new("/run"));
        let limits = s.limits.unwrap();
        assert_eq!(limits.mem_mib, Some(256));
        assert_eq!(limits.cpus, Some(1.5));
        assert!(s.new_pid_ns && s.tun && s.die_with_parent);
        assert_eq!(
            s.vmm_args,
            vec![OsString::from("--kernel"), "/vmlinux".into()]
        );
    }

    #[test]
    fn defaults() {
        let s = cli(&[]).unwrap();
        assert_eq!(s.jail_dir(), Path::new("/srv/vessel/jail/vm-1"));
        assert!(s.ro_binds.is_empty() && s.rw_bind.is_none() && !s.new_pid_ns);
        assert_eq!(s.limits, Some(crate::cgroup::Limits::default()));
        assert_eq!(cli(&["--no-cgroup"]).unwrap().limits, None);
        let e = cli(&["--no-cgroup", "--cgroup-mem-mib", "64"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
    }

    #[test]
    fn ids_follow_the_runtimes_one_rule() {
        for (id, ok) in vessel_protocol::id::test_cases() {
            match validate_id(&id) {
                Ok(()) => assert!(ok, "{id:?} passes here but not in vessel_protocol::id"),
                Err(e) => {
                    assert!(!ok, "{id:?} fails here but passes in vessel_protocol::id");
                    assert_eq!(e, SpecError::BadId(id.clone()));
                }
            }
        }
    }

    #[test]
    fn kept_fds_are_above_stdio_each_once_and_open() {
        let s = cli(&["--keep-fd", "3", "--keep-fd", "7"]).unwrap();
        assert_eq!(s.keep_fds, vec![3, 7]);
        for bad in [
            &["--keep-fd", "2"][..],
            &["--keep-fd", "5", "--keep-fd", "5"],
        ] {
            let e = cli(bad).unwrap_err();
            assert!(e.contains("each descriptor once"), "{e}");
        }
        // An fd this process does not have is refused before anything is created.
        let mut s = cli(&[]).unwrap();
        s.exec = std::env::current_exe().unwrap();
        s.keep_fds = vec![999_999];
        assert_eq!(s.check_host(), Err(SpecError::ClosedKeepFd(999_999)));
    }

    #[test]
    fn root_needs_allow_root() {
        let parse = |uid: &str, gid: &str, allow: bool| {
            let mut argv = vec!["j", "--id", "a", "--exec", "/v", "--uid", uid, "--gid", gid];
            if allow {
                argv.push("--allow-root");
            }
            JailSpec::from_cli(Cli::try_parse_from(argv).unwrap())
        };
        assert_eq!(
            parse("0", "5", false).unwrap_err(),
            SpecError::Root { uid: 0, gid: 5 }
        );
        assert!(matches!(
            parse("5", "0", false),
            Err(SpecError::Root { .. })
        ));
        assert!(parse("0", "0", true).is_ok());
    }

    #[test]
    fn jail_paths() {
        for (p, normal) in [("/a//b/", "/a/b"), ("/a/./b", "/a/b")] {
            assert_eq!(jail_path(Path::new(p)).unwrap(), Path::new(normal));
        }
        for bad in ["a/b", "/", "/a/../b", "", "//"] {
            assert!(jail_path(Path::new(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            host_path(Path::new("/j/x/root"), Path::new("/run/api.sock")),
            Path::new("/j/x/root/run/api.sock")
        );
    }

    #[test]
    fn bad_binds() {
        for bad in ["nocolon", "rel:/x", "/h:rel", "/h:/", "/h:/../etc"] {
            let e = cli(&["--ro-bind", bad]).unwrap_err();
            assert!(
                e.contains("bind") || e.contains("in-jail path"),
                "{bad}: {e}"
            );
        }
        let e = cli(&["--ro-bind", "/h:/dev/kvm"]).unwrap_err();
        assert!(e.contains("reserved"), "{e}");
        let e = cli(&["--ro-bind", "/h:/vessel-vmm"]).unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        let e = cli(&["--ro-bind", "/h:/a", "--rw-bind", "/r:/a/b"]).unwrap_err();
        assert!(e.contains("overlap"), "{e}");
    }

    #[test]
    fn bad_numbers_and_paths() {
        assert!(cli(&["--cgroup-cpus", "0"]).unwrap_err().contains("CPUs"));
        assert!(cli(&["--cgroup-cpus", "NaN"]).unwrap_err().contains("CPUs"));
        assert!(cli(&["--cgroup-mem-mib", "0"])
            .unwrap_err()
            .contains("above 0"));
        assert!(cli(&["--jail-root", "rel"])
            .unwrap_err()
            .contains("absolute"));
        let e = JailSpec::from_cli(
            Cli::try_parse_from([
                "j", "--id", "a", "--exec", "vmm", "--uid", "1", "--gid", "1",
            ])
            .unwrap(),
        )
        .unwrap_err();
        assert_eq!(e, SpecError::BadExec("vmm".into()));
    }

    #[test]
    fn check_host_names_what_is_missing() {
        let s = cli(&["--ro-bind", "/nonexistent-k:/k"]).unwrap();
        let e = s.check_host().unwrap_err().to_string();
        assert!(
            e.contains("--exec") && e.contains("/usr/local/bin/vessel-vmm"),
            "{e}"
        );
        let mut s = s;
        s.exec = std::env::current_exe().unwrap();
        let e = s.check_host().unwrap_err().to_string();
        assert!(e.contains("/nonexistent-k"), "{e}");
    }
}
