//! The control socket: accepts connections and frames requests and responses as lines.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::{parse_request, Request, Response};

/// Longest request line accepted; longer ones close the connection.
const MAX_LINE: usize = 64 * 1024;
/// Most simultaneous API connections.
const MAX_CONNS: usize = 16;

/// Errors on the control socket.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ApiError {
    /// Cannot listen on the API socket {0}: {1}
    Bind(String, std::io::Error),
}

/// What happened on an API fd.
#[derive(Debug)]
pub enum ApiEvent {
    /// A new connection was accepted (watch its fd with the given id).
    Accepted(u32, RawFd),
    /// A complete request from connection `id`.
    Request(u32, Box<Request>),
    /// Connection `id` sent garbage (already answered) or went away.
    Closed(u32),
}

/// Takes the complete request lines out of `buf` (what one connection sent so far) and
/// parses them. Returns the requests, and the answer to give when the connection sent a
/// malformed or overlong request (the connection is then closed; later lines are ignored).
pub fn take_requests(buf: &mut Vec<u8>) -> (Vec<Request>, Option<String>) {
    let mut requests = Vec::new();
    let mut bad = None;
    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        let line = &line[..line.len() - 1];
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match parse_request(line) {
            Ok(req) => requests.push(req),
            Err(e) => {
                bad = Some(format!("invalid request: {e}"));
                break;
            }
        }
    }
    if bad.is_none() && buf.len() > MAX_LINE {
        bad = Some(format!("request longer than {MAX_LINE} bytes"));
    }
    (requests, bad)
}

/// The API listener and its connections.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    conns: HashMap<u32, (UnixStream, Vec<u8>)>,
    next_id: u32,
}

impl ApiServer {
    /// Listens on `path` (an old socket file there is replaced).
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(|e| ApiError::Bind(path.display().to_string(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiError::Bind(path.display().to_string(), e))?;
        Ok(ApiServer {
            listener,
            conns: HashMap::new(),
            next_id: 1,
        })
    }

    /// The listener's fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Fds of live connections with their ids (to re-register on another epoll).
    pub fn conn_fds(&self) -> Vec<(u32, RawFd)> {
        self.conns
            .iter()
            .map(|(id, (s, _))| (*id, s.as_raw_fd()))
            .collect()
    }

    /// Accepts pending connections.
    pub fn accept(&mut self) -> Vec<ApiEvent> {
        let mut out = Vec::new();
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() >= MAX_CONNS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            out.push(ApiEvent::Accepted(id, stream.as_raw_fd()));
            self.conns.insert(id, (stream, Vec::new()));
        }
        out
    }

    /// Reads what connection `id` sent; returns complete requests.
    pub fn read(&mut self, id: u32) -> Vec<ApiEvent> {
        let mut out = Vec::new();
        let Some((stream, buf)) = self.conns.get_mut(&id) else {
            return out;
        };
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let (requests, bad) = take_requests(buf);
        out.extend(
            requests
                .into_iter()
                .map(|req| ApiEvent::Request(id, Box::new(req))),
        );
        if let Some(msg) = bad {
            self.respond(id, &Response::err(msg));
            closed = true;
        }
        if closed {
            self.conns.remove(&id);
            out.push(ApiEvent::Closed(id));
        }
        out
    }

    /// Sends `resp` to connection `id` (blocking briefly; responses are small).
    pub fn respond(&mut self, id: u32, resp: &Response) {
        let Some((stream, _)) = self.conns.get_mut(&id) else {
            return;
        };
        let mut line = serde_json::to_vec(resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        line.push(b'\n');
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(1)));
        let _ = stream.write_all(&line);
        let _ = stream.set_nonblocking(true);
    }
}
