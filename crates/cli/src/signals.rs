//! The signals `vessel run` acts on: SIGINT, SIGTERM, SIGHUP, SIGQUIT,
//! SIGUSR1 and SIGUSR2, caught from the start of the run. Before the container
//! runs (its image read, its VM booting) the first one stops the run: what was
//! made is removed and `vessel run` exits with 128 + the signal. Once the
//! container runs they are forwarded to it.

use tokio::runtime::Runtime;
use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct Signals {
    streams: Vec<(i32, Signal)>,
}

impl Signals {
    /// Catches them from now on: none of them ends this process any more.
    pub fn catch(rt: &Runtime) -> std::io::Result<Signals> {
        let _in = rt.enter();
        let kinds = [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::quit(),
            SignalKind::user_defined1(),
            SignalKind::user_defined2(),
        ];
        let streams = kinds
            .into_iter()
            .map(|k| Ok((k.as_raw_value(), signal(k)?)))
            .collect::<std::io::Result<_>>()?;
        Ok(Signals { streams })
    }

    /// The number of the next signal that arrives (one caught before this call
    /// counts).
    pub async fn next(&mut self) -> i32 {
        std::future::poll_fn(|cx| {
            for (n, s) in self.streams.iter_mut() {
                if s.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*n);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Runs blocking `work` on a thread of its own. If a signal arrives
    /// meanwhile, `interrupted` is called (to make `work` stop early, if it
    /// can) and the signal is returned with `work`'s result, once it ended.
    pub fn during<T: Send>(
        &mut self,
        rt: &Runtime,
        interrupted: impl FnOnce(),
        work: impl FnOnce() -> T + Send,
    ) -> (T, Option<i32>) {
        std::thread::scope(|s| {
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            s.spawn(move || {
                let _ = tx.send(work());
            });
            let done = |r: Result<T, tokio::sync::oneshot::error::RecvError>| {
                r.expect("the worker sends its result unless it panicked")
            };
            rt.block_on(async {
                let sig = tokio::select! {
                    r = &mut rx => return (done(r), None),
                    sig = self.next() => sig,
                };
                interrupted();
                (done(rx.await), Some(sig))
            })
        })
    }
}

/// Exit status after signal `sig` stopped the run.
pub fn status(sig: i32) -> std::process::ExitCode {
    std::process::ExitCode::from((128 + sig).clamp(0, 255) as u8)
}
