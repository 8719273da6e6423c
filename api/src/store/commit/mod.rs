//! Group commit: the write lanes every request's writes go through. Every write of a request is handed to a lane; a lane runs the writes that
//! arrived while its previous group was committing as one transaction and answers every
//! request only after that one commit. So a burst of requests costs one durable commit (one
//! fsync) instead of one each.
//!
//! A group runs, in this order:
//! 1. every rate-limit hit of the group as **one** multi-row upsert: the hits of one (key,
//!    scope, window) add `n` to its row at once and are admitted in arrival order (the i-th
//!    of them sees the count before the statement plus i), rows listed by key id;
//! 2. the other units of work (creates, cancels, claims, reports, grants...), ordered by key
//!    id (arrival order within a key);
//! 3. the rows the units appended to the append-only tables (ledger, audit) and every audit
//!    row of the group, one multi-row insert per table.
//!
//! **Fast path.** A group first runs its units without savepoints, straight in the group's
//! transaction. A unit that fails having changed nothing (its [`Txn`] saw no statement change a
//! row: a create refused for want of credits, a report of an unknown item) needs no rollback
//! and is answered with its error once the group is committed. When anything else fails — a
//! unit after changing rows, a statement error, the group's inserts — the transaction is rolled
//! back before anyone was answered and the group runs again on the isolated path.
//!
//! **Isolated path.** Each unit runs in a savepoint of its own and writes its appended rows
//! there: a unit that fails rolls back to its savepoint without failing the others; audit rows
//! are one insert, and one by one after a failure, so that a bad row fails alone.
//!
//! A hit may carry what its call does next, so that the call waits for one commit: a create's
//! work, run in step 2 of the same group only when its count is within the limit
//! ([`Writes::run_counted`]), or a read's audit row, written in step 3 as admitted or refused
//! ([`Writes::hit_and_audit`]).
//!
//! Invariants stay exact because nothing changes about *what* is decided: the rate-limit
//! count, the conditional wallet update and the idempotency insert are the same statements,
//! under the same row locks. Every group takes its locks in one order (quota rows by key,
//! then the other rows by key), so groups of different nodes cannot deadlock on them. A unit
//! that still meets a deadlock or a serialization failure (rarer shapes, such as a cancel and
//! a report of one batch on two nodes) is rolled back to its savepoint; the units of the group
//! not yet run are not started, the group commits what it has, which releases its locks, and
//! the rest runs again at once.
//!
//! One file per step: [`writes`] (the API), [`lane`] (gathering groups, failing fast),
//! [`quota_step`], [`fast_path`], [`isolated_path`]; [`jobs`] holds what they pass around.
mod fast_path;
mod isolated_path;
mod jobs;
mod lane;
mod quota_step;
mod transaction;
mod writes;

#[cfg(test)]
mod tests;

pub use jobs::{FAILING_FOR, UnitFuture};
pub use writes::{Writes, work};
