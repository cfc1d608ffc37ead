//! `history_budget.rs` again with every registry's store in PostgreSQL: a database of its own on the
//! throwaway cluster the tests start (see `tests::on_postgres`).

#[path = "history_budget.rs"]
mod on_postgres;
