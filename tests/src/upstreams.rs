//! Real upstream proxies for the chaining tests and benchmark: Debian's dante (`danted`, a
//! SOCKS5 server, with or without user/password) and tinyproxy (HTTP CONNECT with basic
//! auth), each on a free loopback port with its configuration and log in a temp folder,
//! killed (with its worker processes) when dropped.
//!
//! Each connects to targets *from* a loopback address of the caller's choosing (dante's
//! `external`, tinyproxy's `Bind`), so a server can tell from its peer address which proxy
//! a connection came through.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{net::TcpStream, process::Child};

use crate::WAIT;

/// A free loopback port (bound, then released: the proxies here cannot take port 0).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The path of a server program `name` from /usr/sbin or PATH; `None` (after saying so)
/// when it is missing and [`crate::tools::SKIP_MISSING_TOOLS`] is set, else a panic naming
/// the Debian package.
pub fn server_program(name: &str) -> Option<PathBuf> {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.is_file() {
        return Some(sbin);
    }
    crate::tools::required(name)
}

/// A running upstream proxy.
pub struct Upstream {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // The process group made for it: dante forks workers.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

impl Upstream {
    /// The log so far, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn spawn(
        mut cmd: tokio::process::Command,
        addr: SocketAddr,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log.with_extension("stderr"))?)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("spawning the upstream proxy")?;
        let mut up = Self { child, addr, log };
        // Ready once it accepts; bounded like every wait.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(up);
            }
            if let Ok(Some(st)) = up.child.try_wait() {
                bail!(
                    "upstream proxy exited ({st}): {}{}",
                    std::fs::read_to_string(up.log.with_extension("stderr")).unwrap_or_default(),
                    up.log_text()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "upstream proxy not accepting on {addr} within {WAIT:?}: {}",
                    up.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// dante as a SOCKS5 server on a free loopback port, connecting to targets from
    /// `external`. With `auth`, it requires RFC 1929 user/password: dante checks those
    /// against the system's password database, so it runs in a private mount namespace
    /// (`unshare -m`, as root) where a temp passwd and shadow holding that one user are
    /// bound over /etc's. `None` when danted is missing and skipping is allowed.
    pub async fn dante(
        dir: &Path,
        external: Ipv4Addr,
        auth: Option<(&str, &str)>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(danted) = server_program("danted") else {
            return Ok(None);
        };
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let log = dir.join("danted.log");
        let conf = dir.join("danted.conf");
        std::fs::write(
            &conf,
            format!(
                "logoutput: {log}\n\
                 internal: 127.0.0.1 port = {port}\n\
                 external: {external}\n\
                 socksmethod: {method}\n\
                 clientmethod: none\n\
                 user.privileged: root\n\
                 user.unprivileged: nobody\n\
                 client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
                 socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}\n",
                log = log.display(),
                method = if auth.is_some() { "username" } else { "none" },
            ),
        )?;
        let mut cmd;
        match auth {
            None => {
                cmd = tokio::process::Command::new(danted);
            }
            Some((user, pass)) => {
                let (passwd, shadow) = (dir.join("passwd"), dir.join("shadow"));
                let system = std::fs::read_to_string("/etc/passwd")?;
                let mut users: String = system
                    .lines()
                    .filter(|l| l.starts_with("root:") || l.starts_with("nobody:"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                users.push_str(&format!(
                    "{user}:x:4242:4242::/nonexistent:/usr/sbin/nologin\n"
                ));
                std::fs::write(&passwd, users)?;
                std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644))?;
                let hash = std::process::Command::new("openssl")
                    .args(["passwd", "-6", pass])
                    .output()
                    .context("openssl passwd")?;
                anyhow::ensure!(hash.status.success(), "openssl passwd failed");
                let hash = String::from_utf8(hash.stdout)?.trim().to_string();
                std::fs::write(
                    &shadow,
                    format!(
                        "{user}:{hash}:19000:0:99999:7:::\nroot:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
                    ),
                )?;
                std::fs::set_permissions(&shadow, std::fs::Permissions::from_mode(0o600))?;
                cmd = tokio::process::Command::new("unshare");
                cmd.args(["-m", "sh", "-c"]).arg(format!(
                    "mount --bind '{}' /etc/passwd && mount --bind '{}' /etc/shadow && exec '{}' \"$@\"",
                    passwd.display(),
                    shadow.display(),
                    danted.display()
                ));
                cmd.arg("danted");
            }
        }
        cmd.arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("danted.pid"));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(Some(Self::spawn(cmd, addr, log).await?))
    }

    /// tinyproxy as an HTTP CONNECT proxy on a free loopback port, connecting to targets
    /// from `bind`, requiring basic auth with `auth` when given. `None` when tinyproxy is
    /// missing and skipping is allowed.
    pub async fn tinyproxy(
        dir: &Path,
        bind: Ipv4Addr,
        auth: Option<(&str, &str)>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(tinyproxy) = server_program("tinyproxy") else {
            return Ok(None);
        };
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        let mut text = format!(
            "Port {port}\nListen 127.0.0.1\nBind {bind}\nTimeout 600\nMaxClients 200\n\
             LogFile \"{}\"\nLogLevel Info\nAllow 127.0.0.1\n",
            log.display()
        );
        if let Some((u, p)) = auth {
            text.push_str(&format!("BasicAuth {u} {p}\n"));
        }
        std::fs::write(&conf, text)?;
        let mut cmd = tokio::process::Command::new(tinyproxy);
        cmd.arg("-d").arg("-c").arg(&conf);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(Some(Self::spawn(cmd, addr, log).await?))
    }
}
