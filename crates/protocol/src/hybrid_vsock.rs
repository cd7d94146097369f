//! Firecracker-style hybrid vsock handshake.
//!
//! The host connects to the VMM's (or vsock backend's) Unix socket, writes
//! `CONNECT <port>\n` and reads `OK <host_port>\n`; after that the stream is a
//! plain byte pipe to the guest's vsock `port`. The reply comes from the VMM
//! side, which the host treats as untrusted input: it is bounded in length and
//! parsed strictly.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest reply accepted, newline included (`OK 4294967295\n` is 14 bytes).
pub const MAX_REPLY_LEN: usize = 32;

/// Hybrid vsock handshake errors.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum HandshakeError {
    /// I/O error during the hybrid vsock handshake
    Io(#[from] io::Error),
    /// Connection closed during the hybrid vsock handshake after {0} bytes of reply
    Closed(usize),
    /// Hybrid vsock reply longer than 32 bytes
    TooLong,
    /// Malformed hybrid vsock reply {0:?} (expected "OK <port>")
    Malformed(String),
}

/// The request line for guest vsock `port`.
pub fn connect_request(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// Parses one reply line (with or without its trailing `\n`) into the host-side port.
pub fn parse_reply(line: &[u8]) -> Result<u32, HandshakeError> {
    if line.len() > MAX_REPLY_LEN {
        return Err(HandshakeError::TooLong);
    }
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let num = text.strip_prefix("OK ").ok_or_else(malformed)?;
    // Canonical decimal only: digits, no leading zero (but "0" itself).
    if num.is_empty()
        || !num.bytes().all(|b| b.is_ascii_digit())
        || (num.len() > 1 && num.starts_with('0'))
    {
        return Err(malformed());
    }
    num.parse::<u32>().map_err(|_| malformed())
}

/// Performs the handshake on `stream` and returns the host-side port.
///
/// Reads one byte at a time so that no byte after the reply's `\n` (which
/// belongs to the guest's stream) is consumed. The caller applies a timeout.
pub async fn handshake<S>(stream: &mut S, port: u32) -> Result<u32, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(connect_request(port).as_bytes()).await?;
    stream.flush().await?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(HandshakeError::Closed(line.len()));
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return parse_reply(&line);
        }
        if line.len() >= MAX_REPLY_LEN {
            return Err(HandshakeError::TooLong);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_prints_its_cause_once() {
        use std::error::Error as _;
        let e = HandshakeError::Io(io::Error::from(io::ErrorKind::BrokenPipe));
        let source = e.source().expect("wraps the I/O error").to_string();
        assert!(!e.to_string().contains(&source), "{e}");
    }
    use tokio::io::duplex;

    #[test]
    fn parses_good_replies() {
        assert_eq!(parse_reply(b"OK 1073741824\n").unwrap(), 1_073_741_824);
        assert_eq!(parse_reply(b"OK 0").unwrap(), 0);
        assert_eq!(parse_reply(b"OK 4294967295\n").unwrap(), u32::MAX);
    }

    #[test]
    fn rejects_malformed_replies() {
        for bad in [
            &b"\n"[..],
            b"OK\n",
            b"OK \n",
            b"ok 5\n",
            b"OK -5\n",
            b"OK +5\n",
            b"OK 5 6\n",
            b"OK 4294967296\n",
            b"OK 062\n",
            b"OK 00\n",
            b"ERR connection refused\n",
            b"OK 12\r\n",
            b"\xffOK 1\n",
        ] {
            assert!(
                matches!(parse_reply(bad), Err(HandshakeError::Malformed(_))),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(
            parse_reply(&[b'1'; 64]),
            Err(HandshakeError::TooLong)
        ));
    }

    #[test]
    fn request_format() {
        assert_eq!(connect_request(1024), "CONNECT 1024\n");
    }

    #[tokio::test]
    async fn handshake_leaves_stream_bytes_unread() {
        let (mut host, mut vmm) = duplex(256);
        let peer = tokio::spawn(async move {
            let mut req = [0u8; 13];
            vmm.read_exact(&mut req).await.unwrap();
            assert_eq!(&req, b"CONNECT 1024\n");
            vmm.write_all(b"OK 77\nPAYLOAD").await.unwrap();
            vmm
        });
        assert_eq!(handshake(&mut host, 1024).await.unwrap(), 77);
        let mut rest = [0u8; 7];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"PAYLOAD");
        drop(peer.await.unwrap());
    }

    #[tokio::test]
    async fn handshake_rejects_oversized_reply_without_newline() {
        let (mut host, mut vmm) = duplex(4096);
        tokio::spawn(async move {
            let mut req = [0u8; 10];
            vmm.read_exact(&mut req).await.unwrap();
            vmm.write_all(&[b'O'; 1000]).await.unwrap();
            vmm
        });
        assert!(matches!(
            handshake(&mut host, 5).await,
            Err(HandshakeError::TooLong)
        ));
    }

    #[tokio::test]
    async fn handshake_reports_early_close() {
        let (mut host, mut vmm) = duplex(256);
        tokio::spawn(async move {
            let mut req = [0u8; 10];
            vmm.read_exact(&mut req).await.unwrap();
            vmm.write_all(b"OK").await.unwrap();
        });
        assert!(matches!(
            handshake(&mut host, 5).await,
            Err(HandshakeError::Closed(2))
        ));
    }
}
