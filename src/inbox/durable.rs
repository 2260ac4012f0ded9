//! How a batch of new files becomes durable before anyone is told so.
//!
//! The obvious way, one `fsync` per file, costs one device cache flush per
//! file: on ext4 every `fsync` ends in one, and fsyncs from several threads
//! do not share them (each rewrites and waits on the same inode-table and
//! folder blocks in turn; measured: no faster with 3 or 8 threads). On this
//! project's VM disk that capped the server at about one flush per message
//! file, whatever the batch size.
//!
//! So a batch of [`SYNCFS_MIN_FILES`] or more is synced with one
//! `syncfs(2)` per file system: one pass that writes every dirty page and
//! inode of the file system, then one flush. The price, and the reason
//! small batches keep per-file fsyncs: `syncfs` also waits for whatever
//! else is dirty on that file system, so a lone message never waits for
//! another program's writes; a busy server already shares its disk with
//! its own batches.
//!
//! Two details keep the guarantee whole:
//! - On ext4 without a journal, `syncfs` writes some inode-table blocks
//!   after its own flush; the folder is fsynced (one more flush) before any
//!   file is renamed into place, so no name can reach the disk ahead of its
//!   file's inode.
//! - `syncfs` reports write errors of the whole file system (Linux ≥ 5.8);
//!   each file is then also waited on with `sync_file_range`, which reports
//!   an error in its own pages. On any `syncfs` failure the batch falls back
//!   to one fsync per file.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Batches of at least this many files are synced per file system.
pub const SYNCFS_MIN_FILES: usize = 4;

/// Set once `syncfs` turns out not to exist here (an old kernel, a seccomp
/// filter): from then on every file is fsynced, and the warning is said once.
static NO_SYNCFS: AtomicBool = AtomicBool::new(false);

/// Makes the data and inode of each file durable, given with its folder.
/// One result per file, in order.
pub fn sync_files(files: &[(&File, &Path)]) -> Vec<io::Result<()>> {
    if files.len() < SYNCFS_MIN_FILES || NO_SYNCFS.load(Ordering::Relaxed) {
        return files.iter().map(|(f, _)| f.sync_all()).collect();
    }
    // One syncfs per file system (the inbox and sent folders share one).
    let mut done: Vec<(u64, Result<(), ()>)> = Vec::new();
    files
        .iter()
        .map(|(file, dir)| {
            let fs = file_system(file);
            let synced = match done.iter().find(|(d, _)| Some(*d) == fs) {
                Some((_, r)) => *r,
                None => {
                    let r = sync_filesystem(dir).map_err(|e| {
                        let missing = matches!(e.kind(), io::ErrorKind::Unsupported)
                            || matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM));
                        if !missing {
                            tracing::warn!(dir = %dir.display(), "syncfs failed ({e}); syncing file by file");
                        } else if !NO_SYNCFS.swap(true, Ordering::Relaxed) {
                            tracing::warn!("syncfs is not available ({e}); syncing file by file from now on");
                        }
                    });
                    // A file system we cannot name is synced every time.
                    if let Some(fs) = fs {
                        done.push((fs, r));
                    }
                    r
                }
            };
            match synced {
                Ok(()) => wait_written(file),
                Err(()) => file.sync_all(),
            }
        })
        .collect()
}

/// The device number of the file system holding `file`.
fn file_system(file: &File) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        file.metadata().ok().map(|m| m.dev())
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        None
    }
}

/// `syncfs` on the file system holding `dir`, then an fsync of `dir` (a
/// flush after everything `syncfs` wrote).
#[cfg(target_os = "linux")]
fn sync_filesystem(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir)?;
    // SAFETY: a valid open descriptor; the call reads no memory of ours.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    d.sync_all()
}

#[cfg(not(target_os = "linux"))]
fn sync_filesystem(_dir: &Path) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no syncfs here"))
}

/// Waits for `file`'s pages to be written and reports a write error in
/// them (no flush: the `syncfs` before did that).
#[cfg(target_os = "linux")]
fn wait_written(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid open descriptor; the call reads no memory of ours.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn wait_written(file: &File) -> io::Result<()> {
    file.sync_all()
}

/// Starts writing `file`'s data to disk without waiting, so that the
/// syncs that follow find it under way.
pub fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call reads no memory of ours.
        // Only a hint: on error the sync that follows does all the work.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Fsyncs a folder: the names in it are then durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn small_and_large_batches_sync_every_file_in_order() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for n in [1, SYNCFS_MIN_FILES, 9] {
            // One of them is a pipe, which cannot be synced: its error must
            // come back in its place, and only there.
            let bad = n / 2;
            let files: Vec<(File, &Path)> = (0..n)
                .map(|i| {
                    let dir = dirs[i % 2].path();
                    if i == bad {
                        let (_, writer) = std::io::pipe().unwrap();
                        return (File::from(std::os::fd::OwnedFd::from(writer)), dir);
                    }
                    let mut f = tempfile::tempfile_in(dir).unwrap();
                    f.write_all(b"a message").unwrap();
                    (f, dir)
                })
                .collect();
            let refs: Vec<(&File, &Path)> = files.iter().map(|(f, d)| (f, *d)).collect();
            let results = sync_files(&refs);
            assert_eq!(results.len(), n);
            for (i, r) in results.iter().enumerate() {
                assert_eq!(r.is_err(), i == bad, "batch of {n}, file {i}: {r:?}");
            }
        }
    }
}
