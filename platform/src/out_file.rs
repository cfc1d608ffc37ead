//! Files Interpose writes where the user asked, outside any data directory: exported
//! captures, TLS key logs, the CA certificate, client certificates.
//!
//! They hold decrypted traffic or secrets, so each is created with mode 0600 whatever the
//! umask, never through a symbolic link (also a dangling one: `O_NOFOLLOW`, `O_EXCL`), and
//! never over an existing file unless the caller was told to (`--force`). A file written in
//! one go ([`Staged`]) appears whole or not at all: it is written to a temporary file in the
//! same folder and renamed into place. An existing file appended to ([`append`], the key
//! log) must be a regular file of this user that no other user can read or write.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// Mode of every file written here.
pub const MODE: u32 = 0o600;

/// Why a file was not written.
#[derive(Debug, thiserror::Error)]
pub enum OutFileError {
    /// The file exists and overwriting was not asked for.
    #[error("{0} exists: refusing to overwrite it (pass --force to replace it)")]
    Exists(PathBuf),
    /// The path is a symbolic link.
    #[error(
        "{0} is a symbolic link: refusing to write through it (remove it or choose another path)"
    )]
    Symlink(PathBuf),
    /// The path is a directory, a device, a pipe, ...
    #[error("{0} is not a regular file: refusing to write to it")]
    NotRegular(PathBuf),
    /// An existing file other users can read or write.
    #[error(
        "{path} can be read or written by other users (mode {mode:o}): refusing to add secrets \
         to it (remove it, or `chmod 600` it if nobody else has it open)"
    )]
    Exposed { path: PathBuf, mode: u32 },
    /// An existing file of another user.
    #[error(
        "{path} belongs to user {uid}, not to the user running Interpose: refusing to write to it"
    )]
    Foreign { path: PathBuf, uid: u32 },
    /// Any other failure, with the path.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OutFileError + '_ {
    move |source| OutFileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks that `path` may be written: it does not exist, or (with `force`) it is a regular
/// file. A symbolic link is refused either way. Call it before the work that produces the
/// content, so a refusal comes first.
pub fn check(path: &Path, force: bool) -> Result<(), OutFileError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
        Ok(m) if m.file_type().is_symlink() => Err(OutFileError::Symlink(path.to_owned())),
        Ok(m) if !m.is_file() => Err(OutFileError::NotRegular(path.to_owned())),
        Ok(_) if force => Ok(()),
        Ok(_) => Err(OutFileError::Exists(path.to_owned())),
    }
}

/// Options that create a new private file and follow no link.
fn create_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true)
        .create_new(true)
        .mode(MODE)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    o
}

/// Creates `path` (which must not exist, and is not a link) with mode 0600, for writing.
pub fn create(path: &Path) -> Result<File, OutFileError> {
    match create_options().open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(check(path, false)
            .err()
            .unwrap_or_else(|| OutFileError::Exists(path.to_owned()))),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Creates `path` for writing as [`create`] does; with `force`, a regular file already
/// there is removed first (a link never is: it is refused).
pub fn create_replacing(path: &Path, force: bool) -> Result<File, OutFileError> {
    check(path, force)?;
    if force {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(path)(e)),
            _ => {}
        }
    }
    create(path)
}

/// Opens `path` for appending, creating it with mode 0600 when missing. An existing one must
/// be a regular file (not a link) owned by this user and private: a file others could read
/// may be open in their hands already, and tightening its mode would not close that.
pub fn append(path: &Path) -> Result<File, OutFileError> {
    let mut o = OpenOptions::new();
    o.append(true).create(true).mode(MODE).custom_flags(
        // NONBLOCK: opening a FIFO does not wait for a reader; it is refused below.
        (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
    );
    let file = match o.open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Err(OutFileError::Symlink(path.to_owned()));
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(OutFileError::NotRegular(path.to_owned()));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(OutFileError::Foreign {
            path: path.to_owned(),
            uid: meta.uid(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(OutFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(file)
}

/// A file being written to a temporary name beside its destination, renamed into place by
/// [`Staged::commit`]; dropped uncommitted, the temporary file is removed.
#[derive(Debug)]
pub struct Staged {
    dest: PathBuf,
    tmp: PathBuf,
    force: bool,
    file: Option<File>,
}

impl Staged {
    /// Checks `dest` (see [`check`]) and creates the temporary file beside it.
    pub fn new(dest: &Path, force: bool) -> Result<Self, OutFileError> {
        check(dest, force)?;
        let name = dest
            .file_name()
            .ok_or_else(|| OutFileError::NotRegular(dest.to_owned()))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut attempt = 0;
        loop {
            let mut rnd = [0u8; 6];
            rustix::rand::getrandom(&mut rnd, rustix::rand::GetRandomFlags::empty())
                .map_err(|e| io_err(dest)(e.into()))?;
            let suffix = proto::hex::encode(&rnd);
            let tmp = dir.join(format!(".{}.{suffix}.tmp", name.to_string_lossy()));
            match create_options().open(&tmp) {
                Ok(file) => {
                    return Ok(Self {
                        dest: dest.to_owned(),
                        tmp,
                        force,
                        file: Some(file),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1;
                }
                Err(e) => return Err(io_err(&tmp)(e)),
            }
        }
    }

    /// The temporary file, to write the content to.
    #[expect(
        clippy::expect_used,
        reason = "present from `create` until `commit`, which consumes self"
    )]
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("present until commit")
    }

    /// Flushes the content to disk and puts the file at its destination: only where nothing
    /// is, or (with `force`) in place of a regular file; never in place of a link.
    pub fn commit(mut self) -> Result<(), OutFileError> {
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(io_err(&self.tmp))?;
        }
        if self.force {
            // Checked again right before: a link put there meanwhile is not replaced.
            check(&self.dest, true)?;
            fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        } else {
            publish_new(&self.tmp, &self.dest)?;
        }
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Renames `tmp` to `dest` only when `dest` does not exist (as anything, a dangling link
/// included); a hard link where the filesystem cannot rename so.
fn publish_new(tmp: &Path, dest: &Path) -> Result<(), OutFileError> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    let exists = || {
        check(dest, false)
            .err()
            .unwrap_or_else(|| OutFileError::Exists(dest.to_owned()))
    };
    match renameat_with(CWD, tmp, CWD, dest, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(exists()),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            match fs::hard_link(tmp, dest) {
                Ok(()) => {
                    let _ = fs::remove_file(tmp);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
                Err(e) => Err(io_err(dest)(e)),
            }
        }
        Err(e) => Err(io_err(dest)(e.into())),
    }
}

/// Writes `bytes` to `dest` whole (see [`Staged`]).
pub fn write(dest: &Path, bytes: &[u8], force: bool) -> Result<(), OutFileError> {
    use std::io::Write;
    let mut staged = Staged::new(dest, force)?;
    staged.file().write_all(bytes).map_err(io_err(dest))?;
    staged.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn written_files_are_private_whole_and_never_replace_unasked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("out.pcap");
        write(&f, b"one", false).expect("new");
        assert_eq!(mode(&f), 0o600);
        let err = write(&f, b"two", false).expect_err("exists");
        assert!(matches!(err, OutFileError::Exists(_)), "{err}");
        assert!(err.to_string().contains("out.pcap exists"), "{err}");
        assert_eq!(fs::read(&f).expect("read"), b"one");
        // An existing loose file replaced with --force is private afterwards.
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        write(&f, b"two", true).expect("forced");
        assert_eq!(fs::read(&f).expect("read"), b"two");
        assert_eq!(mode(&f), 0o600);
        // Dropped without commit: nothing left behind.
        drop(Staged::new(&dir.path().join("never"), false).expect("staged"));
        assert!(!dir.path().join("never").exists());
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[test]
    fn links_are_refused_also_dangling_and_also_with_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        fs::write(&target, b"keep").expect("write");
        let live = dir.path().join("live");
        let dangling = dir.path().join("dangling");
        symlink(&target, &live).expect("symlink");
        symlink(dir.path().join("nowhere"), &dangling).expect("symlink");
        for link in [&live, &dangling] {
            for force in [false, true] {
                let err = write(link, b"x", force).expect_err("link");
                assert!(matches!(err, OutFileError::Symlink(_)), "{err}");
                let err = create_replacing(link, force).expect_err("link");
                assert!(matches!(err, OutFileError::Symlink(_)), "{err}");
            }
            let err = append(link).expect_err("link");
            assert!(matches!(err, OutFileError::Symlink(_)), "{err}");
        }
        assert_eq!(fs::read(&target).expect("read"), b"keep");
        assert!(!dir.path().join("nowhere").exists());
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn append_creates_private_files_and_refuses_exposed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("keys.log");
        drop(append(&p).expect("create"));
        assert_eq!(mode(&p), 0o600);
        drop(append(&p).expect("reopen"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = append(&p).expect_err("exposed");
        assert!(
            matches!(err, OutFileError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        assert_eq!(mode(&p), 0o644, "left as found");
        let err = append(dir.path()).expect_err("a directory");
        assert!(
            matches!(err, OutFileError::NotRegular(_) | OutFileError::Io { .. }),
            "{err}"
        );
    }
}
