//! The history budget's command-line options, shared by `registry-svc` and `interpose up`.

use crate::backend::sled_store::{HistoryOptions, WhenFull};

/// `--history-max-bytes` and `--history-full`.
#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    /// Disk budget of the proxy history's packet bytes, e.g. 500MiB, 10GiB, 2GB; 0: no
    /// budget. Shown, with what was evicted or refused, by `interpose conns stats`.
    #[arg(long, default_value = "10GiB", value_parser = proto::size::parse, value_name = "SIZE")]
    pub history_max_bytes: u64,
    /// At the budget: `evict` deletes the oldest history (whole segment files) to make room,
    /// `stop` records no new history until some is purged. Either is counted and logged.
    #[arg(long, value_enum, default_value_t = WhenFull::Evict, value_name = "POLICY")]
    pub history_full: WhenFull,
    /// Memory for the records' cache (sled's), e.g. 32MiB.
    #[arg(long, default_value = "32MiB", value_parser = proto::size::parse, value_name = "SIZE")]
    pub records_cache: u64,
    /// Memory for closed history segments' indexes (read from disk again when dropped).
    #[arg(long, default_value = "16MiB", value_parser = proto::size::parse, value_name = "SIZE")]
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
