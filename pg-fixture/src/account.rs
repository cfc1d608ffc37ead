//! Who the server runs as. `initdb` and `postgres` refuse to run as root, and the tests and
//! CI run as root: then the cluster's programs run as `nobody` through `setpriv` (util-linux,
//! in every Debian), in a directory handed to that user. Anyone else runs them as themselves.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::chown;
use std::path::Path;
use std::process::Command;

/// The user the cluster's programs run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Account {
    /// The calling user, who is not root.
    Current,
    /// An unprivileged user the calling root switches to.
    Unprivileged { uid: u32, gid: u32 },
}

/// `nobody`'s IDs when /etc/passwd does not list it (Debian's values).
const NOBODY: (u32, u32) = (65534, 65534);

impl Account {
    /// The account for a cluster started by this process.
    pub(crate) fn for_server() -> Account {
        if !rustix::process::geteuid().is_root() {
            return Account::Current;
        }
        let (uid, gid) = fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|passwd| nobody_in(&passwd))
            .unwrap_or(NOBODY);
        Account::Unprivileged { uid, gid }
    }

    /// The command line that runs `program` as this account.
    pub(crate) fn argv(&self, program: &Path) -> Vec<OsString> {
        let mut argv = Vec::new();
        if let Account::Unprivileged { uid, gid } = self {
            argv.extend(
                [
                    "setpriv".to_owned(),
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".to_owned(),
                    "--".to_owned(),
                ]
                .map(OsString::from),
            );
        }
        argv.push(program.into());
        argv
    }

    /// A [`Command`] that runs `program` as this account.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let argv = self.argv(program);
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        command
    }

    /// Makes `path` this account's, so that the server can use it.
    pub(crate) fn give(&self, path: &Path) -> io::Result<()> {
        match self {
            Account::Current => Ok(()),
            Account::Unprivileged { uid, gid } => chown(path, Some(*uid), Some(*gid)),
        }
    }
}

/// `nobody`'s user and group IDs in the text of /etc/passwd.
fn nobody_in(passwd: &str) -> Option<(u32, u32)> {
    let line = passwd.lines().find(|line| line.starts_with("nobody:"))?;
    let mut fields = line.split(':').skip(2);
    let uid = fields.next()?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    Some((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_is_read_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65533:nobody:/nonexistent:/usr/sbin/nologin\n";
        assert_eq!(nobody_in(passwd), Some((65534, 65533)));
        assert_eq!(nobody_in("root:x:0:0::/root:/bin/sh\n"), None);
        assert_eq!(nobody_in("nobody:x:bad:1::/:/bin/sh\n"), None);
    }

    #[test]
    fn root_switches_to_the_unprivileged_user() {
        let account = Account::Unprivileged { uid: 7, gid: 8 };
        let argv = account.argv(Path::new("/usr/bin/initdb"));
        assert_eq!(
            argv,
            [
                "setpriv",
                "--reuid=7",
                "--regid=8",
                "--clear-groups",
                "--",
                "/usr/bin/initdb"
            ]
            .map(OsString::from)
        );
        assert_eq!(
            Account::Current.argv(Path::new("initdb")),
            [OsString::from("initdb")]
        );
    }
}
