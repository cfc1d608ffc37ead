//! Private files: data directories are 0700 and every file in them 0600, whatever the umask
//! the user started the process with, also for files created later by libraries we do not
//! control (sled's `db`, `conf`, `blobs/`, snapshots).
//!
//! Three pieces: [`restrict_umask`] makes every later creation private; [`create_dir`] and
//! [`open_options`] create our own directories and files private from the start; and
//! [`tighten`] fixes a data directory found with looser modes (an older release, a copy, a
//! careless `chmod`), which every server calls through [`prepare_data_dir`] and logs.
//!
//! A data directory, or anything in it, that belongs to another user is refused rather than
//! fixed: that user could have planted a token, a CA key or a client key there, and would
//! keep access through it.

use std::{
    fs::{self, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Mode of every data directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in a data directory.
pub const FILE_MODE: u32 = 0o600;

/// Sets the process umask to 077, so that whatever the process creates from now on (our own
/// files and those of sled or any other library) is readable by its owner only. Returns the
/// previous umask. Servers call it first thing; client subcommands (which write files the
/// user asked for, such as an exported PCAP) do not.
pub fn restrict_umask() -> u32 {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077)).as_raw_mode()
}

/// Creates `dir` and any missing parents (new ones 0700), then makes `dir` itself 0700.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    set_mode(dir, DIR_MODE)
}

/// Options that create a file with mode 0600 (an existing file keeps its mode: [`tighten`]
/// fixes those). Set read/write/append on the result as needed.
pub fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Writes `bytes` to a new file `path` (which must not exist, not even as a dangling
/// symbolic link) with mode 0600.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = open_options()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Makes every directory under `root` (itself included) 0700 and every regular file 0600
/// where the mode is looser; returns the paths it changed. Symbolic links are neither
/// followed nor changed.
pub fn tighten(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut fixed = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    // Another process of the same data directory (a registry beside an export-svc) may
    // remove a temporary file meanwhile: what is gone needs no fixing.
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    while let Some(path) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Err(e) if gone(&e) => continue,
            other => other?,
        };
        let want = if meta.is_dir() {
            let entries = match fs::read_dir(&path) {
                Err(e) if gone(&e) => continue,
                other => other?,
            };
            for entry in entries {
                stack.push(entry?.path());
            }
            DIR_MODE
        } else if meta.is_file() {
            FILE_MODE
        } else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & !want != 0 {
            match set_mode(&path, mode & want) {
                Err(e) if gone(&e) => continue,
                other => other?,
            }
            fixed.push(path);
        }
    }
    Ok(fixed)
}

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory or something in it belongs to another user.
    #[error(
        "{path} belongs to user {owner}, not to user {me} running this process: refusing to \
         use it (another user could have planted a token or key there; `chown` it, or choose \
         another --data-dir)"
    )]
    Foreign { path: PathBuf, owner: u32, me: u32 },
    /// Reading, creating or fixing it failed.
    #[error("preparing data directory {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

/// Refuses `root` and everything under it (links included, not followed) unless this
/// process's effective user owns it.
pub fn check_owned(root: &Path) -> Result<(), DataDirError> {
    let me = rustix::process::geteuid().as_raw();
    let io = |source| DataDirError::Io {
        dir: root.to_owned(),
        source,
    };
    // The directory itself may be reached through a link (e.g. a data home on another
    // disk); its target is what must be ours.
    let top = match fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let foreign = |path: &Path, owner: u32| DataDirError::Foreign {
        path: path.to_owned(),
        owner,
        me,
    };
    use std::os::unix::fs::MetadataExt;
    if top.uid() != me {
        return Err(foreign(root, top.uid()));
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            other => other.map_err(io)?,
        };
        for entry in entries {
            let path = entry.map_err(io)?.path();
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Removed meanwhile (a temporary file of a running process).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            if meta.uid() != me {
                return Err(foreign(&path, meta.uid()));
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// What every server does with its data directory before it opens anything in it: refuse it
/// when another user owns it or anything in it ([`check_owned`]), umask 077, create it 0700,
/// and fix looser modes of what is already there (logged as a warning naming each path, so
/// an operator sees that the directory had been readable). Returns the paths it fixed.
pub fn prepare_data_dir(dir: &Path) -> Result<Vec<PathBuf>, DataDirError> {
    restrict_umask();
    check_owned(dir)?;
    let io = |source| DataDirError::Io {
        dir: dir.to_owned(),
        source,
    };
    create_dir(dir).map_err(io)?;
    let fixed = tighten(dir).map_err(io)?;
    for path in &fixed {
        tracing::warn!(path = %path.display(), "was readable by other users: mode tightened to owner-only");
    }
    Ok(fixed)
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    #[test]
    fn tighten_fixes_loose_dirs_and_files_and_leaves_tight_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("data");
        fs::create_dir_all(root.join("registry/blobs")).expect("mkdir");
        fs::write(root.join("registry/db"), b"x").expect("write");
        fs::write(root.join("registry/blobs/1"), b"x").expect("write");
        fs::write(root.join("token"), b"x").expect("write");
        set_mode(&root, 0o755).expect("chmod");
        set_mode(&root.join("registry"), 0o777).expect("chmod");
        // Explicit: other tests in this process may have set the umask to 077.
        set_mode(&root.join("registry/blobs"), 0o755).expect("chmod");
        set_mode(&root.join("registry/db"), 0o644).expect("chmod");
        set_mode(&root.join("registry/blobs/1"), 0o666).expect("chmod");
        set_mode(&root.join("token"), 0o400).expect("chmod");
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).expect("symlink");

        let mut fixed = tighten(&root).expect("tighten");
        fixed.sort();
        assert_eq!(
            fixed,
            vec![
                root.clone(),
                root.join("registry"),
                root.join("registry/blobs"),
                root.join("registry/blobs/1"),
                root.join("registry/db"),
            ]
        );
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("registry")), 0o700);
        assert_eq!(mode(&root.join("registry/db")), 0o600);
        assert_eq!(mode(&root.join("registry/blobs/1")), 0o600);
        // Tighter than required stays as it is; the link's target is never touched.
        assert_eq!(mode(&root.join("token")), 0o400);
        assert_ne!(mode(Path::new("/etc/passwd")) & 0o044, 0);
        assert!(tighten(&root).expect("again").is_empty());
    }

    #[test]
    fn created_dirs_and_files_are_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b");
        create_dir(&dir).expect("create");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        let f = dir.join("f");
        write_new(&f, b"secret").expect("write");
        assert_eq!(mode(&f), 0o600);
        assert!(write_new(&f, b"again").is_err(), "never overwrites");
    }

    #[test]
    fn a_data_dir_with_anything_of_another_user_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("data");
        fs::create_dir_all(root.join("mtls")).expect("mkdir");
        fs::write(root.join("mtls/ca-key.pem"), b"k").expect("write");
        assert!(prepare_data_dir(&root).is_ok());
        if !rustix::process::geteuid().is_root() {
            // Only root can give a file away; `/` stands in as a directory of another user.
            let err = check_owned(Path::new("/")).expect_err("root's");
            assert!(err.to_string().contains("belongs to user 0"), "{err}");
            return;
        }
        let nobody = Some(65534);
        std::os::unix::fs::chown(root.join("mtls/ca-key.pem"), nobody, None).expect("chown");
        let err = prepare_data_dir(&root).expect_err("planted key");
        assert!(
            err.to_string().starts_with(&format!(
                "{} belongs to user 65534, not to user 0",
                root.join("mtls/ca-key.pem").display()
            )),
            "{err}"
        );
        fs::remove_file(root.join("mtls/ca-key.pem")).expect("rm");
        std::os::unix::fs::chown(&root, nobody, None).expect("chown");
        let err = prepare_data_dir(&root).expect_err("their dir");
        assert!(
            matches!(err, DataDirError::Foreign { owner: 65534, .. }),
            "{err}"
        );
        assert_eq!(mode(&root) & 0o777, 0o700, "left as found");
    }
}
