//! The one id rule for sandboxes, containers and exec processes, on the host
//! (CLI, shim, runtime, jailer) and in the guest (agent).
//!
//! An id is 1 to 64 characters from `[A-Za-z0-9_.-]` and starts with a letter
//! or a digit. It becomes a directory name, a cgroup name and part of Unix
//! socket paths (hence the length), and it must never be `.`, `..` or contain
//! `/`. Every id the usual callers generate passes: containerd, CRI, Docker,
//! Podman and nerdctl use 64 hex digits, and containerd's own identifier rule
//! (`[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`) is a subset of this one (ids chosen
//! with `ctr` longer than 64 characters are refused up front).

/// Longest valid id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Whether `id` follows the id rule: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// An id that breaks the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
/// invalid id {0:?}: use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit
pub struct InvalidId(pub String);

/// Checks `id` against the rule.
pub fn check_id(id: &str) -> Result<(), InvalidId> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(InvalidId(id.to_string()))
    }
}

/// Ids with their verdict under the rule: the table every copy of the rule
/// (the dependency-free one in vessel-jailer) is tested against.
pub fn test_cases() -> Vec<(String, bool)> {
    let mut cases: Vec<(String, bool)> = [
        ("a", true),
        ("0", true),
        ("A-b_c.d", true),
        ("abc-1_2.3", true),
        ("vm", true),
        ("check-1234-clone", true),
        ("", false),
        (".", false),
        ("..", false),
        (".hidden", false),
        ("-a", false),
        ("_a", false),
        ("a/b", false),
        ("a b", false),
        ("a:b", false),
        ("é", false),
        ("a\n", false),
    ]
    .iter()
    .map(|(id, ok)| (id.to_string(), *ok))
    .collect();
    // What containerd, CRI, Docker and Podman generate.
    let hex = "0123456789abcdef".repeat(4);
    cases.push((hex.clone(), true));
    cases.push(("x".repeat(MAX_ID_LEN), true));
    cases.push(("x".repeat(MAX_ID_LEN + 1), false));
    cases.push((format!("{hex}-exec"), false));
    cases.push(("y".repeat(128), false));
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_decides_every_case() {
        for (id, ok) in test_cases() {
            assert_eq!(valid_id(&id), ok, "{id:?}");
            assert_eq!(check_id(&id).is_ok(), ok, "{id:?}");
        }
        let e = check_id("a/b").unwrap_err().to_string();
        assert!(
            e.contains("\"a/b\"") && e.contains("1-64 characters"),
            "{e}"
        );
    }
}
