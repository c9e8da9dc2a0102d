//! `site run --shards`: the threads of shards 1 and on (named `skiff-shard-N`), each running
//! a one-thread runtime (what a shard is: `skiff_router::shard`). Shard 0 is the runtime `main`
//! runs the site on.

use std::time::Duration;

use tokio::sync::oneshot;

/// A running shard: its runtime's handle, and what stops it.
pub struct Shard {
    handle: tokio::runtime::Handle,
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Shard {
    /// Starts the shard numbered `index` (from 1; the first, 0, is the main runtime) on a
    /// thread of its own, with `busy_poll` as its spin window (zero: none).
    pub fn start(index: usize, busy_poll: Duration) -> std::io::Result<Shard> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("skiff-shard-{index}"))
            .spawn(move || {
                skiff_router::shard::enter(index);
                let mut builder = tokio::runtime::Builder::new_current_thread();
                crate::spin::install(&mut builder, busy_poll);
                let runtime = match builder.enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async move {
                    if !busy_poll.is_zero() {
                        tokio::spawn(crate::spin::spinner());
                    }
                    let _ = stopped.await;
                });
            })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the shard's thread ended at once"))??;
        Ok(Shard {
            handle,
            stop,
            thread,
        })
    }

    /// The shard's runtime.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    /// Stops the shard: its runtime drops the tasks it still runs.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
