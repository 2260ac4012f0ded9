//! The server's message-file writer: one thread that writes whatever
//! messages are waiting as one batch ([`super::write_batch`]), the way the
//! store commits its writes (group commit).
//!
//! Every caller still waits until its own file is durable under its name,
//! but a burst of messages shares its syncs instead of paying two journal
//! commits each, and no thread is started per message (the blocking pool
//! grew to hundreds of threads under load, each paying for a fresh stack
//! and heap).

use std::io;
use std::path::PathBuf;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::Rendered;

/// Work for the writer thread: render a message file, on that thread.
type Stage = Box<dyn FnOnce() -> io::Result<Rendered> + Send>;
type Job = (Stage, oneshot::Sender<io::Result<PathBuf>>);

/// Most messages written together.
const MAX_BATCH: usize = 256;

/// Handle to the writer thread. Clone freely; the thread stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    pub fn start() -> io::Result<Writer> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("indiepm-files".into())
            .spawn(move || write_loop(rx))?;
        Ok(Writer { jobs })
    }

    /// Runs `render` on the writer thread (it calls [`super::render_file`])
    /// and returns the file's path once the file is durable.
    pub async fn write(
        &self,
        render: impl FnOnce() -> io::Result<Rendered> + Send + 'static,
    ) -> io::Result<PathBuf> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((Box::new(render), tx))
            .map_err(|_| io::Error::other("the file writer has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the file writer has stopped"))?
    }
}

fn write_loop(jobs: mpsc::Receiver<Job>) {
    while let Some(batch) = crate::app::next_batch(&jobs, MAX_BATCH) {
        let (stages, replies): (Vec<Stage>, Vec<_>) = batch.into_iter().unzip();
        // Rendering parses a stranger's markdown: should it ever panic, that
        // message fails and the thread lives on.
        let staged = stages
            .into_iter()
            .map(|stage| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(stage))
                    .unwrap_or_else(|_| Err(io::Error::other("rendering the message panicked")))
            })
            .collect();
        for (result, reply) in super::write_batch(staged).into_iter().zip(replies) {
            // A caller that gave up waiting still has its file written.
            let _ = reply.send(result);
        }
    }
}
