//! Process resource limits every binary sets at start.
//!
//! A proxy holds two sockets per relayed connection plus the registry's files and gRPC
//! connections; the usual soft open-files limit of 1,024 runs out long before the machine
//! does (the hard limit is often far higher), and then the SOCKS listener and the management
//! API starve each other. Raising the soft limit to the hard one is what the kernel allows
//! any process to do.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises the soft open-files limit to the hard limit; returns `(before, after)` and logs
/// the change (or why it could not be made). `None` stands for unlimited.
pub fn raise_open_files() -> (Option<u64>, Option<u64>) {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return (limit.current, limit.current);
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(
                from = ?limit.current,
                to = ?limit.maximum,
                "raised the soft open-files limit to the hard limit"
            );
            (limit.current, limit.maximum)
        }
        Err(e) => {
            tracing::warn!(soft = ?limit.current, hard = ?limit.maximum, "could not raise the open-files limit: {e}");
            (limit.current, limit.current)
        }
    }
}

/// Keeps the process alive under a file-size limit (`ulimit -f`): by default SIGXFSZ kills
/// it; with a handler installed a write past the limit fails with EFBIG instead, which the
/// registry treats as a full disk (history counted as unwritten, records kept). Call from
/// inside the runtime.
pub fn survive_file_size_limit() {
    let xfsz = tokio::signal::unix::SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw());
    match tokio::signal::unix::signal(xfsz) {
        Ok(mut s) => {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::debug!("SIGXFSZ: a write went past the file-size limit");
                }
            });
        }
        Err(e) => tracing::warn!("could not handle SIGXFSZ: {e}"),
    }
}

/// The soft open-files limit in force now; `None` for unlimited.
pub fn open_files() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (_, after) = raise_open_files();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current, now.maximum);
        assert_eq!(after, now.current);
        assert_eq!(open_files(), now.current);
    }
}
