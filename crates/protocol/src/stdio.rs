//! Process stdio streams: the header that opens one.
//!
//! The host opens one connection per stream to [`crate::ports::STDIO_VSOCK_PORT`]
//! and writes one ASCII line of at most [`MAX_HEADER_LEN`] bytes (newline included):
//!
//! ```text
//! STDIO <container_id> <exec_id | -> <stdin | stdout | stderr | tty>\n
//! ```
//!
//! (`-` names the container's init process). The agent answers `OK\n` or
//! `ERR <reason>\n` (then closes). After `OK` the connection is a raw byte pipe:
//! - `stdin`: host -> process; the host shutting down its write side closes the
//!   process's stdin.
//! - `stdout` / `stderr`: process -> host; output produced before the host
//!   connected is buffered (bounded; the process blocks when the buffer is full).
//!   The agent shuts the stream down after the last byte.
//! - `tty`: both directions on the pty master of a terminal process.
//!
//! Each stream can be attached once.

use std::fmt;

/// Longest header line accepted, newline included.
pub const MAX_HEADER_LEN: usize = 256;

/// The agent's answer to a good header.
pub const REPLY_OK: &str = "OK\n";

/// Which stream of a process a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
    Tty,
}

impl StdioStream {
    pub fn as_str(self) -> &'static str {
        match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
            StdioStream::Tty => "tty",
        }
    }
}

/// A parsed header line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioHeader {
    pub container_id: String,
    /// `None` = the container's init process (`-` on the wire).
    pub exec_id: Option<String>,
    pub stream: StdioStream,
}

/// Why a header line was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum HeaderError {
    /// stdio header longer than 256 bytes
    TooLong,
    /// stdio header is not ASCII
    NotAscii,
    /// stdio header must be `STDIO <container_id> <exec_id|-> <stdin|stdout|stderr|tty>`, got {0:?}
    Malformed(String),
    /// unknown stdio stream {0:?} (expected stdin, stdout, stderr or tty)
    UnknownStream(String),
    /// invalid id {0:?}: use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit
    BadId(String),
}

/// Ids in a header follow the one id rule.
pub use crate::id::valid_id;

impl StdioHeader {
    /// Parses one header line (with or without its trailing `\n`).
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        if line.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLong);
        }
        if !line.is_ascii() {
            return Err(HeaderError::NotAscii);
        }
        // ASCII was checked above, so this is valid UTF-8.
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let words: Vec<&str> = text.split(' ').collect();
        let [magic, container_id, exec_id, stream] = words[..] else {
            return Err(HeaderError::Malformed(text.to_string()));
        };
        if magic != "STDIO" {
            return Err(HeaderError::Malformed(text.to_string()));
        }
        if !valid_id(container_id) {
            return Err(HeaderError::BadId(container_id.to_string()));
        }
        let exec_id = match exec_id {
            "-" => None,
            id if valid_id(id) => Some(id.to_string()),
            id => return Err(HeaderError::BadId(id.to_string())),
        };
        let stream = match stream {
            "stdin" => StdioStream::Stdin,
            "stdout" => StdioStream::Stdout,
            "stderr" => StdioStream::Stderr,
            "tty" => StdioStream::Tty,
            other => return Err(HeaderError::UnknownStream(other.to_string())),
        };
        Ok(StdioHeader {
            container_id: container_id.to_string(),
            exec_id,
            stream,
        })
    }
}

/// Formats the header line, newline included.
impl fmt::Display for StdioHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "STDIO {} {} {}",
            self.container_id,
            self.exec_id.as_deref().unwrap_or("-"),
            self.stream.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for (exec, stream) in [
            (None, StdioStream::Stdin),
            (Some("e1".to_string()), StdioStream::Stdout),
            (Some("x.y_z-9".to_string()), StdioStream::Stderr),
            (None, StdioStream::Tty),
        ] {
            let h = StdioHeader {
                container_id: "c1".into(),
                exec_id: exec,
                stream,
            };
            let line = h.to_string();
            assert!(line.ends_with('\n'));
            assert_eq!(StdioHeader::parse(line.as_bytes()).unwrap(), h);
        }
        let h = StdioHeader::parse(b"STDIO abc - stdout").unwrap();
        assert_eq!(h.exec_id, None);
    }

    #[test]
    fn refuses_malformed() {
        use HeaderError::*;
        type Check = fn(&HeaderError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"", |e| matches!(e, Malformed(_))),
            (b"\n", |e| matches!(e, Malformed(_))),
            (b"STDIO c - stdout extra\n", |e| matches!(e, Malformed(_))),
            (b"STDIO c -\n", |e| matches!(e, Malformed(_))),
            (b"stdio c - stdout\n", |e| matches!(e, Malformed(_))),
            (b"STDIO  c - stdout\n", |e| matches!(e, Malformed(_))),
            (b"STDIO c - stdout\r\n", |e| matches!(e, UnknownStream(_))),
            (b"STDIO c - pty\n", |e| matches!(e, UnknownStream(_))),
            (b"STDIO ../etc - stdout\n", |e| matches!(e, BadId(_))),
            (b"STDIO c a/b stdout\n", |e| matches!(e, BadId(_))),
            (b"STDIO -c - stdout\n", |e| matches!(e, BadId(_))),
            (b"STDIO c\xff - stdout\n", |e| matches!(e, NotAscii)),
        ];
        for (line, ok) in cases {
            let err = StdioHeader::parse(line).unwrap_err();
            assert!(ok(&err), "{line:?}: {err}");
        }
        let long = format!("STDIO {} - stdout\n", "a".repeat(300));
        assert_eq!(StdioHeader::parse(long.as_bytes()), Err(TooLong));
        let id65 = format!("STDIO {} - stdout\n", "a".repeat(65));
        assert!(matches!(StdioHeader::parse(id65.as_bytes()), Err(BadId(_))));
    }
}
