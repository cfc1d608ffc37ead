//! The database schema: versioned migrations, kept in `registry-svc/migrations/`, applied
//! in order at start by whichever registry process gets there first, in one transaction
//! (a registry killed halfway leaves the database as it was). Version 2 also moves version
//! 1's history rows into blocks, logging its progress.

use postgres::Client;

use crate::backend::StoreError;

/// Every migration, by version.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../../migrations/0001_init.sql")),
    (2, include_str!("../../../migrations/0002_blocks.sql")),
];

/// Advisory lock key that serialises migrations between registry processes.
const MIGRATION_LOCK: i64 = 0x696e_7470_6f73_6501;

/// Brings the database's schema to the latest version; refuses a newer one.
pub fn migrate(client: &mut Client) -> Result<i32, StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    let fresh: bool = tx
        .query_one("SELECT to_regclass('interpose_schema') IS NULL", &[])?
        .get(0);
    if fresh {
        tx.batch_execute(
            "CREATE TABLE interpose_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )?;
    }
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM interpose_schema",
            &[],
        )?
        .get(0);
    let latest = MIGRATIONS.last().map_or(0, |&(v, _)| v);
    if current > latest {
        return Err(StoreError::Invalid(format!(
            "the database's Interpose schema is version {current}, newer than this \
             registry-svc knows ({latest}): run a newer registry-svc"
        )));
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|&&(v, _)| v > current) {
        tracing::info!(version, "migrating the registry database");
        tx.batch_execute(sql)?;
        if version == 2 {
            // Version 1's packets, one row each, move into blocks.
            super::history::move_v1_packets(&mut tx)?;
        }
        tx.execute(
            "INSERT INTO interpose_schema (version) VALUES ($1)",
            &[&version],
        )?;
    }
    tx.commit()?;
    Ok(latest)
}
