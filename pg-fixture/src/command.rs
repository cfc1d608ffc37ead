//! Running a program with a deadline: a hung `initdb` or `pg_ctl` fails the caller with an
//! error naming it instead of hanging the test.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};

use crate::Error;

/// How long to wait for the killed program's pipes to close after a timeout.
const AFTER_KILL: Duration = Duration::from_secs(5);

/// Runs `command` to completion within `limit`, with no standard input, and returns what it
/// printed (standard output, then standard error). `what` names the program in errors.
///
/// A program that fails gives [`Error::Failed`] with its output; one still running at the
/// deadline is killed and gives [`Error::TimedOut`].
pub(crate) fn run(what: &str, mut command: Command, limit: Duration) -> Result<String, Error> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().map_err(|source| Error::Io {
        what: format!("starting {what} ({:?})", command.get_program()),
        source,
    })?;
    let pid = child.id();
    // The waiting happens on its own thread so that this one can give up on it.
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(limit) {
        Ok(Ok(output)) => {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            if output.status.success() {
                Ok(text)
            } else {
                Err(Error::Failed {
                    what: what.to_owned(),
                    status: output.status.to_string(),
                    output: text.trim_end().to_owned(),
                })
            }
        }
        Ok(Err(source)) => Err(Error::Io {
            what: format!("waiting for {what}"),
            source,
        }),
        Err(_) => {
            kill(pid);
            let _ = finished.recv_timeout(AFTER_KILL);
            Err(Error::TimedOut {
                what: what.to_owned(),
                limit,
            })
        }
    }
}

/// Sends SIGKILL to process `pid`, ignoring a process that is already gone.
pub(crate) fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::KILL);
    }
}
