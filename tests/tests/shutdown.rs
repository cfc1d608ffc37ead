//! Every server handles SIGTERM from the moment it prints its ready line: a supervisor (or a
//! test) that stops it as soon as it reads the line gets a clean exit, not a kill.

use tests::{Proc, Registry, Up, bin};
use tokio::process::Command;

type R = anyhow::Result<()>;

/// How often each server is started and stopped at once: the window the ready line used
/// to leave was short, so one try alone would rarely hit it.
const ROUNDS: usize = 3;

#[tokio::test]
async fn servers_exit_cleanly_on_a_sigterm_sent_right_after_their_ready_line() -> R {
    let tmp = tempfile::tempdir()?;
    for round in 0..ROUNDS {
        let reg = Registry::start(&tmp.path().join(format!("reg{round}"))).await?;
        let registry = reg.url.clone();
        assert!(reg.proc.terminate().await?, "registry-svc, round {round}");

        let up = Up::start(&tmp.path().join(format!("up{round}")), &[]).await?;
        assert!(up.proc.terminate().await?, "up, round {round}");

        for svc in ["intercept-svc", "export-svc"] {
            let mut cmd = Command::new(bin(svc));
            // A data directory of its own: the service generates its token there, as every
            // server does without --token.
            let data = tmp.path().join(format!("{svc}{round}"));
            cmd.args(["--listen", "127.0.0.1:0", "--registry", &registry])
                .arg("--data-dir")
                .arg(&data)
                .env_remove("INTERPOSE_TOKEN");
            let log = tmp.path().join(format!("{svc}{round}.log"));
            let proc = Proc::start(cmd, log).await?;
            assert!(proc.terminate().await?, "{svc}, round {round}");
        }
    }
    Ok(())
}
