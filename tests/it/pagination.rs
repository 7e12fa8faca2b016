//! Cursor pagination: every row exactly once, in `(created_at, id)` order, ties included.

use std::collections::HashSet;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{queue_name, Amqp, TestApp};

/// Follows `next_cursor` from the first page to the last; returns every item in order.
fn walk(app: &TestApp, path: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let reply = app.get(&url);
        assert_eq!(reply.status, 200, "{url}: {}", reply.text());
        let page = reply.json();
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= limit);
        items.extend(data.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return items,
        }
    }
    panic!("pagination never ended");
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Inserts rows straight into the partition: `ties` share one `created_at`, then `more` apart.
fn insert_rows(app: &TestApp, tenant: &str, ties: usize, more: usize) -> Vec<String> {
    let mut pg = app.pg();
    let tenant: Uuid = tenant.parse().unwrap();
    let mut inserted = Vec::new();
    for i in 0..ties + more {
        let id = Uuid::new_v4();
        let at = if i < ties {
            "2024-01-01T00:00:00Z"
        } else {
            "2024-01-02T00:00:00Z"
        };
        pg.execute(
            "INSERT INTO messages (id, tenant_id, payload, created_at)
             VALUES ($1, $2, $3, $4::text::timestamptz + $5 * interval '1 ms')",
            &[
                &id,
                &tenant,
                &json!({ "i": i }),
                &at,
                &((i.saturating_sub(ties)) as f64),
            ],
        )
        .unwrap();
        inserted.push(id.to_string());
    }
    inserted
}

#[test]
fn walking_pages_yields_every_row_once_in_order_ties_included() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("paged");
    let inserted = insert_rows(&app, &tenant, 25, 6);
    let items = walk(&app, &format!("/api/tenants/{tenant}/messages"), 7);
    let got = ids(&items);
    assert_eq!(got.len(), 31);
    assert_eq!(
        got.iter().collect::<HashSet<_>>(),
        inserted.iter().collect::<HashSet<_>>()
    );
    let keys: Vec<(chrono::DateTime<chrono::FixedOffset>, Uuid)> = items
        .iter()
        .map(|m| {
            let at = chrono::DateTime::parse_from_rfc3339(m["created_at"].as_str().unwrap());
            (at.unwrap(), m["id"].as_str().unwrap().parse().unwrap())
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "oldest first by (created_at, id)");
    assert_eq!(items[0]["tenant_id"], tenant.as_str());
    assert!(items[0]["payload"].is_object());

    let via_filter = walk(&app, &format!("/api/messages?tenant_id={tenant}"), 10);
    assert_eq!(ids(&via_filter), got);
    let first = app.get(&format!("/api/tenants/{tenant}/messages")).json();
    assert_eq!(
        first["data"].as_array().unwrap().len(),
        10,
        "limit defaults to 10"
    );
}

#[test]
fn pages_never_repeat_a_row_while_rows_are_inserted() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("busy");
    let publisher = std::thread::spawn({
        let queue = queue_name(&tenant);
        move || {
            let mut amqp = Amqp::connect();
            for i in 0..1500 {
                amqp.publish(&queue, json!({ "n": i }).to_string().as_bytes(), None);
            }
            amqp.wait_confirms();
        }
    });
    let mut seen = HashSet::new();
    while seen.len() < 1500 {
        for id in ids(&walk(&app, &format!("/api/tenants/{tenant}/messages"), 25)) {
            seen.insert(id);
        }
        // Each walk starts over: it must never return a row twice within itself.
        let again = ids(&walk(&app, &format!("/api/tenants/{tenant}/messages"), 13));
        assert_eq!(
            again.len(),
            again.iter().collect::<HashSet<_>>().len(),
            "a row repeated"
        );
        if publisher.is_finished() && app.partition_rows(&tenant) == 1500 && seen.len() < 1500 {
            let last = ids(&walk(&app, &format!("/api/tenants/{tenant}/messages"), 100));
            seen.extend(last);
        }
    }
    publisher.join().unwrap();
    assert_eq!(seen.len(), 1500);
}

#[test]
fn paging_over_all_tenants_yields_every_row_once() {
    let app = TestApp::spawn();
    let mut inserted = Vec::new();
    for (name, rows) in [("a", 5), ("b", 0), ("c", 7), ("d", 1)] {
        let tenant = app.create_tenant(name);
        inserted.extend(insert_rows(&app, &tenant, rows / 2, rows - rows / 2));
    }
    for limit in [1, 4, 100] {
        let got = ids(&walk(&app, "/api/messages", limit));
        assert_eq!(got.len(), inserted.len(), "limit {limit}");
        assert_eq!(
            got.iter().collect::<HashSet<_>>(),
            inserted.iter().collect::<HashSet<_>>()
        );
    }
}

#[test]
fn tenants_are_listed_page_by_page() {
    let app = TestApp::spawn();
    let created: Vec<String> = (0..5)
        .map(|i| app.create_tenant(&format!("t{i}")))
        .collect();
    let listed = ids(&walk(&app, "/api/tenants", 2));
    assert_eq!(listed, created, "creation order, each once");
}

#[test]
fn bad_page_parameters_are_refused() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("params");
    for path in [
        format!("/api/tenants/{tenant}/messages"),
        "/api/messages".into(),
        "/api/tenants".into(),
    ] {
        for query in ["limit=0", "limit=101", "limit=abc", "limit=-1"] {
            app.get(&format!("{path}?{query}"))
                .assert_error(400, "limit");
        }
        app.get(&format!("{path}?cursor=garbage"))
            .assert_error(400, "invalid cursor");
    }
    app.get("/api/messages?tenant_id=nope")
        .assert_error(400, "not a tenant id");
    app.get("/api/messages?tenant_id=")
        .assert_error(400, "not a tenant id");
    let unknown = Uuid::new_v4();
    app.get(&format!("/api/tenants/{unknown}/messages"))
        .assert_error(404, "not found");
}

#[test]
fn payloads_come_back_as_stored_even_beyond_f64() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("big numbers");
    let mut amqp = Amqp::connect();
    let body = r#"{"big": 1e400, "exact": 123456789012345678901234567890}"#;
    amqp.publish(&queue_name(&tenant), body.as_bytes(), None);
    amqp.wait_confirms();
    app.wait_rows(&tenant, 1);
    let page = app.get(&format!("/api/tenants/{tenant}/messages"));
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(
        page.text().contains("123456789012345678901234567890"),
        "{}",
        page.text()
    );
}

#[test]
fn a_page_holds_at_most_4_mib_of_payloads_and_a_walk_still_yields_every_row() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "heavy", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let id: Uuid = tenant.parse().unwrap();
    let mut pg = app.pg();
    let insert = |pg: &mut postgres::Client, payload: &str, from: i32, to: i32| {
        let sql = format!(
            "INSERT INTO messages (id, tenant_id, payload, created_at)
             SELECT gen_random_uuid(), $1, {payload}, now() + n * interval '1 ms'
             FROM generate_series({from}, {to}) n"
        );
        pg.execute(&sql, &[&id]).unwrap();
    };
    // 12 rows of 1 MB, then one stored in a few hundred bytes that PostgreSQL prints in 5 MB
    // (each 1e131071 is 131,072 digits), then 3 small ones.
    insert(
        &mut pg,
        "jsonb_build_object('n', n, 'pad', repeat('x', 1000000))",
        0,
        11,
    );
    let huge = format!("'[{}1e131071]'::jsonb", "1e131071,".repeat(39));
    insert(&mut pg, &huge, 12, 12);
    insert(&mut pg, "jsonb_build_object('n', n)", 13, 15);

    let path = format!("/api/tenants/{tenant}/messages");
    let first = app.get(&format!("{path}?limit=100"));
    assert_eq!(
        first.json()["data"].as_array().unwrap().len(),
        4,
        "4 of 1 MB"
    );
    assert!(first.body.len() < 4_300_000, "{} bytes", first.body.len());
    for path in [path, format!("/api/messages?tenant_id={tenant}")] {
        let rows = walk(&app, &path, 100);
        assert_eq!(rows.len(), 16, "every row once");
        let n: Vec<i64> = rows
            .iter()
            .filter_map(|r| r["payload"]["n"].as_i64())
            .collect();
        assert_eq!(n, [(0..12).collect::<Vec<_>>(), vec![13, 14, 15]].concat());
        let left_out = &rows[12];
        assert!(left_out.get("payload").is_none(), "{left_out}");
        assert!(left_out["payload_size"].as_i64().unwrap() > 5_000_000);
        assert!(
            rows[0].get("payload_size").is_none(),
            "said only when left out"
        );
    }
}

#[test]
fn a_deep_page_reads_no_more_rows_than_the_first() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("deep");
    let id: Uuid = tenant.parse().unwrap();
    let mut pg = app.pg();
    pg.execute(
        "INSERT INTO messages (id, tenant_id, payload, created_at)
         SELECT gen_random_uuid(), $1, '{}'::jsonb, now() - n * interval '1 ms'
         FROM generate_series(1, 20000) n",
        &[&id],
    )
    .unwrap();
    pg.batch_execute("ANALYZE messages").unwrap();
    let deep: (chrono::DateTime<chrono::Utc>, Uuid) = {
        let row = pg
            .query_one(
                "SELECT created_at, id FROM messages ORDER BY created_at, id OFFSET 19000 LIMIT 1",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    let explain = format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) {}",
        tenantd::testing::PAGE_AFTER_SQL
    );
    let plan: serde_json::Value = pg
        .query_one(&explain, &[&id, &deep.0, &deep.1, &11i64, &(4i64 << 20)])
        .unwrap()
        .get(0);
    let text = plan.to_string();
    assert!(
        text.contains("created_at_id_idx"),
        "uses the keyset index: {text}"
    );
    assert!(!text.contains("\"Sort\""), "no sort: {text}");
    let scanned = max_actual_rows(&plan);
    assert!(
        scanned <= 11.0,
        "a page 19,000 rows deep read {scanned} rows: {text}"
    );
}

/// The most rows any node of a plan produced.
fn max_actual_rows(plan: &Value) -> f64 {
    match plan {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if k == "Actual Rows" {
                    v.as_f64().unwrap_or(0.0)
                } else {
                    max_actual_rows(v)
                }
            })
            .fold(0.0, f64::max),
        Value::Array(items) => items.iter().map(max_actual_rows).fold(0.0, f64::max),
        _ => 0.0,
    }
}
