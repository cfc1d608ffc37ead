//! Where the PostgreSQL server programs are. Debian installs them per major version under
//! `/usr/lib/postgresql/N/bin`, off PATH, and `pg_config --bindir` names that directory when
//! the development package is there too.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Error, command};

/// The programs a cluster needs, all in one directory (`pg_ctl` runs the `postgres` beside it).
const PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// Where Debian's packages put each major version.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `pg_config --bindir` if it
/// answers, else the highest version under /usr/lib/postgresql, else the first on PATH.
pub(crate) fn find() -> Result<PathBuf, Error> {
    let path = env::var_os("PATH").unwrap_or_default();
    let candidates = pg_config_bindir()
        .into_iter()
        .chain(debian_versions())
        .chain(env::split_paths(&path));
    let mut tried = Vec::new();
    for dir in candidates {
        if has_server(&dir) {
            return Ok(dir);
        }
        tried.push(dir.display().to_string());
    }
    Err(Error::NotInstalled {
        tried: tried.join(", "),
    })
}

/// What `pg_config --bindir` says, if it runs.
fn pg_config_bindir() -> Option<PathBuf> {
    let mut pg_config = Command::new("pg_config");
    pg_config.arg("--bindir");
    let out = command::run("pg_config", pg_config, Duration::from_secs(10)).ok()?;
    let dir = out.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `/usr/lib/postgresql/N/bin` for every installed major version N, highest first.
fn debian_versions() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(DEBIAN_ROOT) else {
        return Vec::new();
    };
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// Whether `dir` holds all the server programs.
fn has_server(dir: &Path) -> bool {
    PROGRAMS.iter().all(|program| dir.join(program).is_file())
}
