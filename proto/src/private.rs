//! Private files: data directories are 0700 and every file in them 0600, whatever the umask
//! the user started the process with, also for files created later by libraries we do not
//! control (sled's `db`, `conf`, `blobs/`, snapshots).
//!
//! Three pieces: [`restrict_umask`] makes every later creation private; [`create_dir`] and
//! [`open_options`] create our own directories and files private from the start; and
//! [`tighten`] fixes a data directory found with looser modes (an older release, a copy, a
//! careless `chmod`), which every server calls through [`prepare_data_dir`] and logs.

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

/// Writes `bytes` to a new file `path` (which must not exist) with mode 0600.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = open_options().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Makes every directory under `root` (itself included) 0700 and every regular file 0600
/// where the mode is looser; returns the paths it changed. Symbolic links are neither
/// followed nor changed.
pub fn tighten(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut fixed = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let want = if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
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
            set_mode(&path, mode & want)?;
            fixed.push(path);
        }
    }
    Ok(fixed)
}

/// What every server does with its data directory before it opens anything in it: umask
/// 077, create it 0700, and fix looser modes of what is already there (logged as a warning
/// naming each path, so an operator sees that the directory had been readable).
pub fn prepare_data_dir(dir: &Path) -> io::Result<()> {
    restrict_umask();
    create_dir(dir)?;
    let fixed = tighten(dir)?;
    for path in &fixed {
        tracing::warn!(path = %path.display(), "was readable by other users: mode tightened to owner-only");
    }
    Ok(())
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
}
