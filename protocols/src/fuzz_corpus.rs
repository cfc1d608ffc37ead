//! The checked-in seed inputs of the fuzz targets (`fuzz/corpus/TARGET`), which the unit
//! tests of [`crate::fuzzing`] also run through each target's properties, read in one place.

use std::io;
use std::path::{Path, PathBuf};

/// The fewest seeds a target's corpus holds; fewer means a broken checkout.
pub const MIN_SEEDS: usize = 3;

/// The directory of fuzz target `target`'s seeds.
pub fn dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// The seeds of fuzz target `target`, in file-name order; an error naming the directory when
/// it cannot be read or holds fewer than [`MIN_SEEDS`] files.
pub fn seeds(target: &str) -> io::Result<Vec<Vec<u8>>> {
    let dir = dir(target);
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
    let mut files = std::fs::read_dir(&dir)
        .map_err(named)?
        .map(|f| f.map(|f| f.path()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(named)?;
    files.sort();
    if files.len() < MIN_SEEDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds {} seeds, expected at least {MIN_SEEDS}",
                dir.display(),
                files.len()
            ),
        ));
    }
    files
        .iter()
        .map(|f| {
            std::fs::read(f).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_targets_seeds_and_names_a_missing_one() {
        let seeds = super::seeds("socks5").expect("socks5 corpus");
        assert!(seeds.len() >= super::MIN_SEEDS);
        let err = super::seeds("no-such-target").expect_err("missing corpus");
        assert!(err.to_string().contains("no-such-target"), "{err}");
    }
}
