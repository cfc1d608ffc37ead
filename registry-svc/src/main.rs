//! The standalone registry-svc binary.

use clap::Parser;

/// jemalloc rather than glibc's malloc: with glibc's per-thread arenas the registry kept
/// about 150 MiB more resident after the same work (1M records, 10 GiB of history, a watch
/// of every record: a 361 MiB peak against 213 MiB; see `docs/BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::serve::init_tracing();
    registry_svc::run(registry_svc::Args::parse()).await
}
