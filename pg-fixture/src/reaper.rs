//! Removing the shared cluster after its test process exits. A `static` is never dropped, so
//! [`Cluster::shared`](crate::Cluster::shared) starts a watcher: a small shell loop in its own
//! process group, detached from the test's output, that waits for the test process to be gone
//! (however it ended, SIGKILL included), then stops the server (immediate shutdown: nothing in
//! it is kept) and deletes the directory.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::{Cluster, Error, STOP_WAIT_SECS};

/// The watcher: `$1` is the process to outlive, `$2` the directory, the rest `pg_ctl stop`.
/// A server that does not stop in time is killed through its PID file.
const SCRIPT: &str = r#"
parent=$1 dir=$2
shift 2
while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
"$@" >/dev/null 2>&1 || {
    pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null) && kill -9 "$pid" 2>/dev/null
}
rm -rf "$dir"
"#;

/// Starts the watcher that removes `cluster` once this process has exited.
pub(crate) fn watch(cluster: &Cluster) -> Result<(), Error> {
    let mut stop = cluster.account.argv(&cluster.bin.join("pg_ctl"));
    stop.extend(
        [
            "stop",
            "-w",
            "-s",
            "-m",
            "immediate",
            "-t",
            &STOP_WAIT_SECS.to_string(),
            "-D",
        ]
        .map(OsString::from),
    );
    stop.push(cluster.data_dir().into());
    Command::new("sh")
        .args(["-c", SCRIPT, "pg-fixture-reaper"])
        .arg(std::process::id().to_string())
        .arg(&cluster.root)
        .args(stop)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C to the test run does not end it before the test.
        .process_group(0)
        .spawn()
        .map_err(|source| Error::Io {
            what: "starting the shared cluster's watcher (sh)".to_owned(),
            source,
        })?;
    Ok(())
}
