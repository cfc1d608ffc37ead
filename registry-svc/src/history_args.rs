//! The history budget's command-line options, shared by `registry-svc` and `interpose up`.

use crate::backend::sled_store::{HistoryOptions, WhenFull};

/// `--history-max-bytes` and `--history-full`.
#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    /// Disk budget of the proxy history's packet bytes, e.g. 500MiB, 10GiB, 2GB; 0: no
    /// budget. Shown, with what was evicted or refused, by `interpose conns stats`.
    #[arg(long, default_value = "10GiB", value_parser = parse_size, value_name = "SIZE")]
    pub history_max_bytes: u64,
    /// At the budget: `evict` deletes the oldest history (whole segment files) to make room,
    /// `stop` records no new history until some is purged. Either is counted and logged.
    #[arg(long, value_enum, default_value_t = WhenFull::Evict, value_name = "POLICY")]
    pub history_full: WhenFull,
    /// Memory for the records' cache (sled's), e.g. 32MiB.
    #[arg(long, default_value = "32MiB", value_parser = parse_size, value_name = "SIZE")]
    pub records_cache: u64,
    /// Memory for closed history segments' indexes (read from disk again when dropped).
    #[arg(long, default_value = "16MiB", value_parser = parse_size, value_name = "SIZE")]
    pub history_index_cache: u64,
}

impl HistoryArgs {
    /// The store's history options.
    pub fn options(&self) -> HistoryOptions {
        HistoryOptions {
            max_bytes: self.history_max_bytes,
            when_full: self.history_full,
            records_cache_bytes: Some(self.records_cache),
            index_cache_bytes: Some(
                usize::try_from(self.history_index_cache).unwrap_or(usize::MAX),
            ),
            ..Default::default()
        }
    }
}

/// A byte size: a number with an optional unit (B, KB, MB, GB, TB in powers of 1000; KiB,
/// MiB, GiB, TiB in powers of 1024; case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 500MiB, 10GiB, 0)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "mb" | "m" => 1000_u64.pow(2),
        "gb" | "g" => 1000_u64.pow(3),
        "tb" | "t" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2 mb"), Ok(2_000_000));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert!(parse_size("ten").unwrap_err().contains("is not a size"));
        assert!(
            parse_size("5 parsecs")
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!(
            parse_size("99999999999TiB")
                .unwrap_err()
                .contains("too large")
        );
    }
}
