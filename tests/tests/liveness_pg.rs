//! `liveness.rs` again with every registry's store in PostgreSQL: a database of its own on the
//! throwaway cluster the tests start (see `tests::on_postgres`).

#[path = "liveness.rs"]
mod on_postgres;
