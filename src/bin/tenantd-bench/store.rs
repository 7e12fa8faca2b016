//! Store: what one batch insert costs PostgreSQL per row, read from the worker's own backend
//! process: tenantd's insert, the same insert `ON CONFLICT DO NOTHING` (what a batch meeting a
//! stored id pays), and the insert at several batch sizes. Alternated round by round, so a
//! slower minute of the machine falls on every variant; medians. Needs PostgreSQL on this
//! machine (its backends' CPU is read from `/proc`).

use std::time::Duration;

use postgres::Client;
use uuid::Uuid;

use crate::procstat;
use crate::stack::Stack;
use crate::{load, percentile, Args, Report};

/// Rows per variant and round.
const ROWS: usize = 20_000;
const ROUNDS: usize = 7;

pub fn run(stack: &mut Stack, _args: &Args, report: &mut Report) {
    stack.start(&[]);
    let tenant = stack.create_tenant("store", "inactive");
    let tenant: Uuid = tenant.parse().unwrap();
    let mut pg = stack.pg();
    let backend: i32 = pg.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let plain = pg.prepare(tenantd::testing::INSERT_SQL).unwrap();
    let skipping = pg
        .prepare(tenantd::testing::INSERT_SKIPPING_STORED_SQL)
        .unwrap();
    let variants = [
        ("store_us_per_row", &plain, 30),
        ("store_on_conflict_us_per_row", &skipping, 30),
        ("store_batch_10_us_per_row", &plain, 10),
        ("store_batch_100_us_per_row", &plain, 100),
    ];
    let mut costs = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, statement, batch)) in variants.iter().enumerate() {
            let cpu = backend_cpu(backend, || {
                insert_rows(&mut pg, statement, tenant, *batch);
            });
            costs[i].push(cpu.as_secs_f64() * 1e6 / ROWS as f64);
        }
    }
    for ((key, _, _), cost) in variants.iter().zip(&costs) {
        report.add(key, percentile(cost, 0.5), "µs");
    }
}

/// Inserts `ROWS` new rows in batches of `batch`, each batch its own transaction.
fn insert_rows(pg: &mut Client, statement: &postgres::Statement, tenant: Uuid, batch: usize) {
    let body = String::from_utf8(load::body(0)).unwrap();
    for _ in 0..ROWS / batch {
        let ids: Vec<Uuid> = (0..batch).map(|_| Uuid::now_v7()).collect();
        let payloads: Vec<&str> = vec![body.as_str(); batch];
        pg.execute(statement, &[&tenant, &ids, &payloads]).unwrap();
    }
}

/// The CPU the backend spent while `work` ran.
fn backend_cpu(backend: i32, work: impl FnOnce()) -> Duration {
    let before = procstat::cpu_time(backend as u32);
    work();
    procstat::cpu_time(backend as u32).saturating_sub(before)
}
