//! Security round 3, the files' half (issue 20, findings 4 and 5): every file Interpose writes
//! where the user asked (exports, the CA certificate, client certificates, key logs) is 0600
//! whatever the umask, never reached through a symbolic link (also a dangling one), never
//! written over an existing file unless `--force`; an existing key log others can read is
//! refused. Real binaries, run under umask 022.

use std::{
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
};

use tests::{Output, Proc, Up, bin};
use tokio::process::Command;

type R = anyhow::Result<()>;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

/// Runs `BIN ARGS` to completion under umask 022 (what most users have), with the token of
/// the server `up` started.
async fn run022(name: &str, args: &[&str], token: Option<&Path>) -> anyhow::Result<Output> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"umask 022; exec "$@""#)
        .arg("sh")
        .arg(bin(name))
        .args(args)
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_TOKEN_FILE")
        .env_remove("INTERPOSE_SERVER")
        // A refusal is one line: no backtrace appended to it.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    if let Some(t) = token {
        cmd.env("INTERPOSE_TOKEN_FILE", t);
    }
    tests::output(cmd).await
}

/// Temporary files an interrupted or refused write could have left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

fn one_line(out: &Output) -> &str {
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[tokio::test]
async fn exports_are_private_never_overwrite_unasked_and_never_follow_links() -> R {
    let tmp = tempfile::tempdir()?;
    let up = Up::start(&tmp.path().join("data"), &[]).await?;
    let token = PathBuf::from(up.proc.field("token").unwrap_or_default());
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir)?;
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o755))?;
    let export = |path: &Path, extra: &[&str]| {
        let p = path.to_string_lossy().into_owned();
        let grpc = up.grpc.clone();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let token = token.clone();
        async move {
            let mut args = vec!["export", "--out", &p, "--server", &grpc];
            args.extend(extra.iter().map(String::as_str));
            run022("interpose", &args, Some(&token)).await
        }
    };

    // A new file: 0600 under umask 022, a whole capture, nothing else left.
    let pcap = out_dir.join("a.pcap");
    let out = export(&pcap, &[]).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(mode(&pcap), 0o600);
    assert!(std::fs::metadata(&pcap)?.len() >= 24);
    assert!(leftovers(&out_dir).is_empty(), "{:?}", leftovers(&out_dir));

    // An existing file is not overwritten unasked: a sentence naming it.
    std::fs::write(&pcap, b"precious")?;
    let out = export(&pcap, &[]).await?;
    assert!(!out.ok);
    assert_eq!(
        one_line(&out),
        format!(
            "interpose: {} exists: refusing to overwrite it (pass --force to replace it)",
            pcap.display()
        )
    );
    assert_eq!(std::fs::read(&pcap)?, b"precious");
    // A live export refuses it the same way.
    let out = export(&pcap, &["--follow"]).await?;
    assert!(!out.ok);
    assert!(one_line(&out).contains("exists: refusing to overwrite it"));
    assert_eq!(std::fs::read(&pcap)?, b"precious");
    // --force replaces it, and the result is private even if the old file was not.
    std::fs::set_permissions(&pcap, std::fs::Permissions::from_mode(0o644))?;
    let out = export(&pcap, &["--force"]).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_ne!(std::fs::read(&pcap)?, b"precious");
    assert_eq!(mode(&pcap), 0o600);

    // Symbolic links are refused, a dangling one too, with or without --force; their
    // targets are neither created nor touched.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"keep")?;
    let live = out_dir.join("live.pcap");
    symlink(&victim, &live)?;
    let dangling = out_dir.join("dangling.pcap");
    let nowhere = tmp.path().join("created-through-a-link");
    symlink(&nowhere, &dangling)?;
    for link in [&live, &dangling] {
        for extra in [
            &[][..],
            &["--force"],
            &["--follow"],
            &["--follow", "--force"],
        ] {
            let out = export(link, extra).await?;
            assert!(!out.ok, "{extra:?}");
            assert_eq!(
                one_line(&out),
                format!(
                    "interpose: {} is a symbolic link: refusing to write through it (remove it \
                     or choose another path)",
                    link.display()
                ),
                "{extra:?}"
            );
        }
    }
    assert_eq!(std::fs::read(&victim)?, b"keep");
    assert!(!nowhere.exists());
    assert!(leftovers(&out_dir).is_empty(), "{:?}", leftovers(&out_dir));

    // A live export's file is 0600 too, and `-` is still stdout.
    let live_file = out_dir.join("live-new.pcapng");
    let mut follow = Command::new("sh");
    follow
        .arg("-c")
        .arg(r#"umask 022; exec "$@""#)
        .arg("sh")
        .arg(bin("interpose"))
        .args(["export", "--follow", "--out"])
        .arg(&live_file)
        .args(["--server", &up.grpc])
        .env("INTERPOSE_TOKEN_FILE", &token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = follow.spawn()?;
    tests::eventually("the live export's file", || {
        let f = live_file.clone();
        async move { Ok(f.exists().then_some(())) }
    })
    .await?;
    assert_eq!(mode(&live_file), 0o600);
    let _ = child.kill().await;
    let out = export(Path::new("-"), &[]).await?;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stderr.contains("to stdout"), "{}", out.stderr);
    Ok(())
}

#[tokio::test]
async fn ca_certificate_and_client_certificates_are_private_files() -> R {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let up = Up::start(&data, &[]).await?;
    let token = PathBuf::from(up.proc.field("token").unwrap_or_default());
    let pem = tmp.path().join("ca.pem");
    let p = pem.to_string_lossy().into_owned();
    let args = ["ca", "export", "--out", &p, "--server", &up.grpc];
    let out = run022("interpose", &args, Some(&token)).await?;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(mode(&pem), 0o600);
    let out = run022("interpose", &args, Some(&token)).await?;
    assert!(!out.ok);
    assert!(
        one_line(&out)
            .ends_with("ca.pem exists: refusing to overwrite it (pass --force to replace it)"),
        "{}",
        out.stderr
    );
    let forced = [&args[..], &["--force"]].concat();
    let out = run022("interpose", &forced, Some(&token)).await?;
    assert!(out.ok, "{}", out.stderr);
    let link = tmp.path().join("link.pem");
    symlink(tmp.path().join("nowhere.pem"), &link)?;
    let l = link.to_string_lossy().into_owned();
    let out = run022(
        "interpose",
        &["ca", "export", "--out", &l, "--force", "--server", &up.grpc],
        Some(&token),
    )
    .await?;
    assert!(!out.ok);
    assert!(
        one_line(&out).contains("is a symbolic link"),
        "{}",
        out.stderr
    );
    assert!(!tmp.path().join("nowhere.pem").exists());

    // Client certificates: 0600 under umask 022, never written through a link.
    let d = data.to_string_lossy().into_owned();
    let certs = tmp.path().join("certs");
    let c = certs.to_string_lossy().into_owned();
    let issue = |name: &'static str| {
        let (c, d) = (c.clone(), d.clone());
        async move {
            run022(
                "interpose",
                &[
                    "ca",
                    "issue-client",
                    "--name",
                    name,
                    "--out",
                    &c,
                    "--data-dir",
                    &d,
                ],
                None,
            )
            .await
        }
    };
    let out = issue("alice").await?;
    assert!(out.ok, "{}", out.stderr);
    for f in ["alice-cert.pem", "alice-key.pem", "ca-cert.pem"] {
        assert_eq!(mode(&certs.join(f)), 0o600, "{f}");
    }
    let planted = tmp.path().join("planted-key.pem");
    symlink(&planted, certs.join("bob-key.pem"))?;
    let out = issue("bob").await?;
    assert!(!out.ok);
    assert!(
        one_line(&out).contains("bob-key.pem exists"),
        "{}",
        out.stderr
    );
    assert!(!planted.exists(), "no key written through the link");
    Ok(())
}

/// proxy-core with `--keylog FILE`, no registry needed to start.
/// With `starts`, waits for its ready line; otherwise runs it to its (refusing) exit.
async fn proxy_keylog(
    tmp: &Path,
    keylog: &Path,
    starts: bool,
) -> anyhow::Result<Result<Proc, Output>> {
    let data = tmp.join("proxy-data").to_string_lossy().into_owned();
    let k = keylog.to_string_lossy().into_owned();
    let args = [
        "--socks",
        "127.0.0.1:0",
        "--registry",
        "http://127.0.0.1:9",
        "--data-dir",
        &data,
        "--keylog",
        &k,
    ];
    if !starts {
        let out = run022("proxy-core", &args, None).await?;
        anyhow::ensure!(!out.ok, "proxy-core started");
        return Ok(Err(out));
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"umask 022; exec "$@""#)
        .arg("sh")
        .arg(bin("proxy-core"))
        .args(args)
        .env_remove("INTERPOSE_TOKEN");
    Ok(Ok(Proc::start(cmd, tmp.join("proxy.log")).await?))
}

#[tokio::test]
async fn a_keylog_is_private_and_an_exposed_or_linked_one_is_refused() -> R {
    let tmp = tempfile::tempdir()?;
    // New: created 0600 whatever the umask.
    let fresh = tmp.path().join("keys.log");
    let proxy = proxy_keylog(tmp.path(), &fresh, true)
        .await?
        .map_err(|o| anyhow::anyhow!("refused: {}", o.stderr))?;
    assert_eq!(mode(&fresh), 0o600);
    drop(proxy);

    // An existing file other users can read: refused, left as found.
    let exposed = tmp.path().join("exposed.log");
    std::fs::write(&exposed, b"CLIENT_RANDOM old\n")?;
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644))?;
    let out = proxy_keylog(tmp.path(), &exposed, false)
        .await?
        .err()
        .expect("an exposed key log is refused");
    assert!(
        out.stderr.contains(&format!(
            "--keylog: {} can be read or written by other users (mode 644): refusing to add \
             secrets to it",
            exposed.display()
        )),
        "{}",
        out.stderr
    );
    assert_eq!(mode(&exposed), 0o644);
    assert_eq!(std::fs::read(&exposed)?, b"CLIENT_RANDOM old\n");

    // A private existing one is accepted.
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o600))?;
    let proxy = proxy_keylog(tmp.path(), &exposed, true)
        .await?
        .map_err(|o| anyhow::anyhow!("refused: {}", o.stderr))?;
    drop(proxy);

    // Links are never followed, dangling or not.
    let target = tmp.path().join("target.log");
    std::fs::write(&target, b"")?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
    let live = tmp.path().join("live-link.log");
    symlink(&target, &live)?;
    let dangling = tmp.path().join("dangling-link.log");
    let nowhere = tmp.path().join("nowhere.log");
    symlink(&nowhere, &dangling)?;
    for link in [&live, &dangling] {
        let out = proxy_keylog(tmp.path(), link, false)
            .await?
            .err()
            .expect("a link is refused");
        assert!(
            out.stderr.contains(&format!(
                "--keylog: {} is a symbolic link: refusing to write through it",
                link.display()
            )),
            "{}",
            out.stderr
        );
    }
    assert!(!nowhere.exists());
    assert_eq!(std::fs::read(&target)?, b"");
    Ok(())
}
