//! `vessel-jailer`: starts one `vessel-vmm` confined, like Firecracker's jailer.
//!
//! The VMM gets its own mount namespace and `pivot_root`s into `<jail_root>/<id>/root`,
//! which holds only the VMM binary (and, for a dynamically linked one, its libraries),
//! /dev/kvm, /dev/urandom, optionally /dev/net/tun, the files the caller binds read-only
//! and one read-write run directory. It runs in cgroup `vessel/<id>`, with rlimits, no
//! inherited descriptors beyond 0-2, `PR_SET_NO_NEW_PRIVS`, no supplementary groups,
//! an unprivileged uid/gid and an environment cleared down to [`spec::ENV_ALLOW_LIST`].
//! The jailer stays as its parent, forwards signals and cleans up ([`run`]).

pub use vessel_cgroup as cgroup;
pub mod child;
pub mod elf;
pub mod jail;
pub mod run;
pub mod spec;

pub use run::{run, RunError};
pub use spec::{Cli, JailSpec};
