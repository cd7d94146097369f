//! Logs a guest can grow (the serial console, the output of the hypervisor
//! and of its helpers), kept under a size and a rate cap.
//!
//! A [`BoundedLog`] is one append-only file that never exceeds
//! [`Limits::max_bytes`]. When the next write would pass the cap, the file is
//! truncated and restarted with a marker line and the newest half of what was
//! written, so the newest output is always kept (and a tail of the file is
//! always the newest output; a reader can find the file empty for the
//! moment between the truncation and the rewrite). Output over [`Limits::bytes_per_sec`] (a token
//! bucket holding one second's worth) is dropped and the drop is noted in the
//! file when output flows again. Writing never fails: a console is best
//! effort, and a full disk must not stop a guest.
//!
//! Only `write` and `ftruncate` are used after the file is open (the
//! built-in VMM writes its console from seccomp-filtered vCPU threads).
//! [`drain`] copies a pipe into a bounded log on a thread, for processes that
//! cannot cap their own output (QEMU, virtiofsd, vhost-device-vsock).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Default size cap of one log: 1 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024;
/// Default rate cap of one log: 256 KiB/s.
pub const DEFAULT_BYTES_PER_SEC: u64 = 256 * 1024;
/// Smallest size cap accepted (room for the marker and a useful tail).
pub const MIN_MAX_BYTES: u64 = 4096;

const WRAPPED: &[u8] = b"\n[vessel: log cap reached; older output dropped]\n";

/// Size and rate caps of one log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The file never grows past this many bytes (at least [`MIN_MAX_BYTES`]).
    pub max_bytes: u64,
    /// Sustained bytes per second accepted; 0 means no rate cap.
    pub bytes_per_sec: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_BYTES,
            bytes_per_sec: DEFAULT_BYTES_PER_SEC,
        }
    }
}

/// A log file under a size and rate cap. See the crate documentation.
#[derive(Debug)]
pub struct BoundedLog {
    file: File,
    len: u64,
    max: u64,
    /// The newest bytes written (at most `max / 2`), rewritten after a wrap.
    tail: VecDeque<u8>,
    rate: u64,
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl BoundedLog {
    /// Creates (or truncates) `path`: a regular file, mode 0600, never
    /// through a symlink.
    pub fn create(path: &Path, limits: Limits) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_APPEND | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        Ok(Self::new(file, limits))
    }

    /// Wraps `file`, which must be empty and opened with `O_APPEND`.
    pub fn new(file: File, limits: Limits) -> Self {
        let max = limits.max_bytes.max(MIN_MAX_BYTES);
        BoundedLog {
            file,
            len: 0,
            max,
            tail: VecDeque::new(),
            rate: limits.bytes_per_sec,
            tokens: limits.bytes_per_sec as f64,
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// How much of `want` bytes the rate cap lets through now.
    fn admit(&mut self, want: usize) -> usize {
        if self.rate == 0 {
            return want;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate as f64;
        self.last = now;
        self.tokens = (self.tokens + refill).min(self.rate as f64);
        let n = (self.tokens as usize).min(want);
        self.tokens -= n as f64;
        n
    }

    fn append(&mut self, data: &[u8]) {
        // Pieces of at most a quarter of the cap: after a wrap the file holds
        // the marker, half a cap of tail and one piece, which fits.
        for piece in data.chunks((self.max / 4) as usize) {
            if self.len + piece.len() as u64 > self.max {
                self.wrap();
            }
            self.raw_write(piece);
            self.remember(piece);
        }
    }

    fn remember(&mut self, piece: &[u8]) {
        let keep = (self.max / 2) as usize;
        let piece = &piece[piece.len().saturating_sub(keep)..];
        let excess = (self.tail.len() + piece.len()).saturating_sub(keep);
        self.tail.drain(..excess);
        self.tail.extend(piece);
    }

    fn wrap(&mut self) {
        // SAFETY: ftruncate on a file we own; no memory is passed.
        if unsafe { libc::ftruncate(self.file.as_raw_fd(), 0) } != 0 {
            // Cannot shrink: stop writing rather than grow past the cap.
            self.len = u64::MAX / 2;
            return;
        }
        self.len = 0;
        self.raw_write(WRAPPED);
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        self.raw_write(&tail);
    }

    fn raw_write(&mut self, data: &[u8]) {
        if self.len.saturating_add(data.len() as u64) > self.max {
            return;
        }
        if self.file.write_all(data).is_ok() {
            self.len += data.len() as u64;
        }
    }
}

impl Write for BoundedLog {
    /// Always accepts all of `buf` (what the caps refuse is dropped).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.admit(buf.len());
        if n > 0 && self.dropped > 0 {
            let note = format!(
                "\n[vessel: {} bytes dropped: over the log rate cap]\n",
                self.dropped
            );
            self.dropped = 0;
            self.append(note.as_bytes());
        }
        self.dropped += (buf.len() - n) as u64;
        self.append(&buf[..n]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Copies `from` (a pipe's read end) into `log` on a thread until end of
/// file: the thread lives as long as any writer (the process it serves).
pub fn drain(
    from: impl Read + Send + 'static,
    log: BoundedLog,
    name: &str,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    drain_then(from, log, name, || {})
}

fn drain_then(
    mut from: impl Read + Send + 'static,
    mut log: BoundedLog,
    name: &str,
    done: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let _ = log.write(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            done();
        })
}

/// A drain of [`pipe_to`] that has not reached end of file yet.
struct Pending {
    path: PathBuf,
    done: Arc<(Mutex<bool>, Condvar)>,
}

/// The drains of [`pipe_to`] still running, by log path: an entry leaves
/// when its thread finishes, so the list holds only live helpers' logs.
static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<Pending>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits, at most `timeout`, until everything written into the pipes of
/// [`pipe_to`] for `path` is in the log: when a process has exited, its last
/// words may still be in the pipe. Returns false on timeout (a descendant
/// of the process can keep the pipe open); true at once if no drain for
/// `path` is running.
pub fn wait_drained(path: &Path, timeout: Duration) -> bool {
    let waits: Vec<_> = pending()
        .iter()
        .filter(|p| p.path == path)
        .map(|p| p.done.clone())
        .collect();
    let deadline = Instant::now() + timeout;
    waits.iter().all(|w| {
        let (lock, cv) = &**w;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = cv
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    })
}

/// A pipe whose read end is drained into a new bounded log at `path`;
/// returns the write end for the process to write to.
pub fn pipe_to(path: &Path, limits: Limits) -> std::io::Result<File> {
    let log = BoundedLog::create(path, limits)?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: pipe2 just returned these fds and nothing else owns them.
    let (rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    pending().push(Pending {
        path: path.to_path_buf(),
        done: done.clone(),
    });
    let mine = done.clone();
    let finished = move || {
        pending().retain(|p| !Arc::ptr_eq(&p.done, &mine));
        let (lock, cv) = &*mine;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    };
    if let Err(e) = drain_then(rd, log, &name, finished) {
        pending().retain(|p| !Arc::ptr_eq(&p.done, &done));
        return Err(e);
    }
    Ok(wr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_drained_returns_once_the_last_words_are_in_the_log() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("helper.log");
        let mut w = pipe_to(&p, limits(1 << 20, 1 << 20)).unwrap();
        for i in 0..100 {
            writeln!(w, "line {i}").unwrap();
        }
        assert!(!wait_drained(&p, Duration::ZERO), "the writer is open");
        drop(w);
        assert!(wait_drained(&p, Duration::from_secs(30)));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with("line 99\n"), "{text}");
        assert!(wait_drained(&p, Duration::ZERO), "nothing left to wait for");
    }

    fn limits(max: u64, rate: u64) -> Limits {
        Limits {
            max_bytes: max,
            bytes_per_sec: rate,
        }
    }

    #[test]
    fn stays_under_the_cap_and_keeps_the_newest_output() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let mut log = BoundedLog::create(&p, limits(8192, 0)).unwrap();
        for i in 0..10_000u32 {
            writeln!(log, "line {i}").unwrap();
            assert!(std::fs::metadata(&p).unwrap().len() <= 8192);
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with("line 9999\n"), "{text}");
        assert!(text.contains("log cap reached"));
        assert!(
            text.len() > 4096,
            "a wrap keeps half the cap: {}",
            text.len()
        );
        // One write larger than the cap keeps its own end.
        log.write_all(&vec![b'x'; 100_000]).unwrap();
        log.write_all(b"END").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.len() <= 8192 && text.ends_with("xxxEND"));
    }

    #[test]
    fn over_the_rate_is_dropped_and_noted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let mut log = BoundedLog::create(&p, limits(1 << 20, 1000)).unwrap();
        log.write_all(&[b'a'; 5000]).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        assert!((1000..1100).contains(&len), "one second's worth: {len}");
        log.tokens = 1000.0; // as if a second passed
        log.write_all(b"later\n").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("bytes dropped"), "{text}");
        assert!(text.ends_with("later\n"));
    }

    #[test]
    fn refuses_links_and_special_files() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(BoundedLog::create(&link, Limits::default()).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(BoundedLog::create(Path::new("/dev/null"), Limits::default()).is_err());
    }

    #[test]
    fn a_pipe_is_drained_until_its_writers_close() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let mut w = pipe_to(&p, limits(4096, 0)).unwrap();
        for _ in 0..1000 {
            w.write_all(&[b'z'; 100]).unwrap();
        }
        w.write_all(b"done").unwrap();
        drop(w);
        let ok = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            std::fs::read(&p).unwrap().ends_with(b"done")
        });
        assert!(ok);
        assert!(std::fs::metadata(&p).unwrap().len() <= 4096);
    }
}
