//! Just enough HTTP/1.0 for a metrics endpoint: read a request head, answer with one
//! body and close; and the client side, GET and read one bounded body.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request head read.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// The content type of the text exposition format prometheus-client writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A request line: method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
}

/// Reads a request head (up to the blank line, at most [`MAX_REQUEST_HEAD`] bytes);
/// `None` if it is not one.
pub async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Request> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_request_line(&head)
}

/// `GET /metrics HTTP/1.1` -> method and path.
pub fn parse_request_line(head: &[u8]) -> Option<Request> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut words = line.split(' ');
    let (method, path, version) = (words.next()?, words.next()?, words.next()?);
    if words.next().is_some() || !version.starts_with("HTTP/1.") || !path.starts_with('/') {
        return None;
    }
    Some(Request {
        method: method.to_string(),
        path: path.to_string(),
    })
}

/// Writes a whole response and closes the write side.
pub async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Answers a request for metrics: `render` for a GET, 405 for anything else.
pub async fn answer<S, F>(stream: &mut S, render: F) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = String>,
{
    match read_request(stream).await {
        Some(r) if r.method == "GET" => {
            let body = render.await;
            respond(stream, "200 OK", CONTENT_TYPE, &body).await
        }
        Some(_) => respond(stream, "405 Method Not Allowed", "text/plain", "GET only\n").await,
        None => respond(stream, "400 Bad Request", "text/plain", "bad request\n").await,
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum HttpError {
    /// I/O
    Io(#[from] std::io::Error),
    /// the response is larger than {0} bytes
    TooLarge(usize),
    /// bad response: {0}
    Bad(String),
}

/// Sends `GET path` and returns the body of a 200 response, reading at most `max` bytes.
pub async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
    max: usize,
) -> Result<String, HttpError> {
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    (&mut *stream)
        .take(max as u64 + 1)
        .read_to_end(&mut raw)
        .await?;
    if raw.len() > max {
        return Err(HttpError::TooLarge(max));
    }
    let text = String::from_utf8(raw).map_err(|_| HttpError::Bad("not UTF-8".into()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| HttpError::Bad("no end of head".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(HttpError::Bad(status.chars().take(80).collect()));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let r = parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/metrics"));
        assert!(parse_request_line(b"GET metrics HTTP/1.1\r\n").is_none());
        assert!(parse_request_line(b"GET / SPDY\r\n").is_none());
        assert!(parse_request_line(b"\xff\r\n").is_none());
    }

    #[tokio::test]
    async fn get_answers_and_bounds() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            answer(&mut b, async { "m 1\n".to_string() }).await.unwrap();
        });
        assert_eq!(get(&mut a, "/metrics", 1024).await.unwrap(), "m 1\n");
        server.await.unwrap();

        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let _ = answer(&mut b, async { "x".repeat(10_000) }).await;
        });
        assert!(matches!(
            get(&mut a, "/", 1024).await,
            Err(HttpError::TooLarge(1024))
        ));

        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let _ = b.write_all(&vec![b'A'; MAX_REQUEST_HEAD + 1]).await;
            let mut c = b;
            let _ = c.shutdown().await;
        });
        assert!(read_request(&mut a).await.is_none());
    }
}
