//! `/metrics`: the Prometheus series an operator scrapes, valid by `promtool check metrics`.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::{queue_name, wait_until, Amqp, TestApp};
use serde_json::json;
use std::time::Duration;

/// The admin token of the metrics tests.
const TOKEN: &str = "metrics-tests-admin-token-0123456789abcdef";

/// `/metrics` as an operator scrapes it: in full (an open API is everyone's).
fn scrape(app: &TestApp) -> String {
    scrape_as(app, Some(TOKEN))
}

/// `/metrics` with this admin token, or none.
fn scrape_as(app: &TestApp, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let reply = crate::support::http::request_with(&app.base(), "GET", "/metrics", &headers, None);
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    reply.text()
}

/// The value of the series `name{labels}` in a scrape.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_count_each_tenants_messages_and_pass_promtool() {
    let app = TestApp::spawn_with(|c| c.api_token = Some(TOKEN.into()));
    let base = app.base();
    let bearer = format!("Bearer {TOKEN}");
    let auth = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    let create = |body: serde_json::Value| {
        let body = body.to_string();
        let reply = crate::support::http::request_with(
            &base,
            "POST",
            "/api/tenants",
            &auth,
            Some(body.as_bytes()),
        );
        assert_eq!(reply.status, 201, "{}", reply.text());
        reply.json()["id"].as_str().unwrap().to_string()
    };
    let active = create(json!({"name": "measured"}));
    let paused = create(json!({"name": "waiting", "status": "inactive"}));
    let mut amqp = Amqp::connect();
    for i in 0..25 {
        amqp.publish(
            &queue_name(&active),
            json!({ "i": i }).to_string().as_bytes(),
            None,
        );
    }
    for i in 0..5 {
        amqp.publish(
            &queue_name(&paused),
            json!({ "i": i }).to_string().as_bytes(),
            None,
        );
    }
    amqp.wait_confirms();
    app.wait_rows(&active, 25);

    let text = scrape(&app);
    let stored = format!("tenantd_messages_stored_total{{tenant_id=\"{active}\"}}");
    wait_until(Duration::from_secs(5), "stored count", || {
        value(&scrape(&app), &stored) == Some(25.0)
    });
    let workers = format!("tenantd_tenant_workers{{tenant_id=\"{active}\"}}");
    assert_eq!(value(&text, &workers), Some(3.0));
    let waiting = format!("tenantd_queue_messages{{tenant_id=\"{paused}\"}}");
    assert_eq!(
        value(&text, &waiting),
        Some(5.0),
        "queue depth read from the broker"
    );
    // This replica's own registry: exactly its own requests and tenants.
    let created = "tenantd_http_requests_total{route=\"/api/tenants\",status=\"201\"}";
    assert_eq!(value(&text, created), Some(2.0), "{text}");
    let consumed = format!("tenantd_messages_consumed_total{{tenant_id=\"{active}\"}}");
    assert_eq!(value(&text, &consumed), Some(25.0));
    let batches = value(&text, "tenantd_batch_messages_count").unwrap_or(0.0);
    assert!(
        (1.0..=25.0).contains(&batches),
        "25 messages in 1 to 25 batches: {batches}"
    );
    let committed = value(&text, "tenantd_delivery_to_commit_seconds_count");
    assert_eq!(committed, Some(25.0), "one latency per stored message");
    assert_eq!(value(&text, "tenantd_consumers_running"), Some(1.0));
    let paused_workers = format!("tenantd_tenant_workers{{tenant_id=\"{paused}\"}}");
    assert_eq!(
        value(&text, &paused_workers),
        None,
        "a paused tenant has no consumer"
    );
    // Paused once it ran: its concurrency goes with its consumer.
    let pause = crate::support::http::request_with(
        &base,
        "PATCH",
        &format!("/api/tenants/{active}"),
        &auth,
        Some(br#"{"status":"inactive"}"#),
    );
    assert_eq!(pause.status, 200, "{}", pause.text());
    wait_until(
        Duration::from_secs(10),
        "the paused tenant's workers series gone",
        || value(&scrape(&app), &workers).is_none(),
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_deleted_or_failed_tenant_leaves_no_series_behind() {
    let proxy = crate::support::proxy::Proxy::start(&crate::support::amqp_host_port());
    let url = crate::support::amqp_url_via(proxy.port());
    let app = TestApp::spawn_with(|c| c.rabbitmq_url = url);
    let doomed = app.create_tenant("measured, then deleted");
    let mut amqp = Amqp::connect();
    amqp.publish(&queue_name(&doomed), b"{}", None);
    amqp.wait_confirms();
    app.wait_rows(&doomed, 1);
    let series = |text: &str, tenant: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("tenant_id=\"{tenant}\"")))
            .count()
    };
    assert!(series(&scrape(&app), &doomed) > 0);
    let reply = app.request("DELETE", &format!("/api/tenants/{doomed}"), None);
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert_eq!(
        series(&scrape(&app), &doomed),
        0,
        "the deleted tenant's series are gone"
    );

    proxy.cut();
    let failed = app.request("POST", "/api/tenants", Some(r#"{"name": "never"}"#));
    failed.assert_error(503, "broker");
    proxy.restore();
    let text = scrape(&app);
    assert!(
        !text.lines().any(|l| l.contains("tenant_id=\"")),
        "a failed create leaves no series: {text}"
    );
}

#[test]
fn anonymous_callers_see_no_tenant_and_no_internal_error_and_operators_see_all() {
    let proxy = crate::support::proxy::Proxy::start(&crate::support::amqp_host_port());
    let url = crate::support::amqp_url_via(proxy.port());
    let metrics_token = "metrics-token-of-the-tests-0123456789abcdef";
    let app = TestApp::spawn_with(|c| {
        c.rabbitmq_url = url;
        c.api_token = Some(TOKEN.into());
        c.jwt_hs256_secret = Some(crate::support::tokens::SECRET.into());
        c.metrics_token = Some(metrics_token.into());
    });
    let tenant = crate::auth::create_tenant(&app.base(), TOKEN, "measured");
    let names_a_tenant = |text: &str| text.contains(&format!("tenant_id=\"{tenant}\""));
    let anonymous = scrape_as(&app, None);
    assert!(!anonymous.contains("tenant_id"), "{anonymous}");
    assert!(
        anonymous.contains("tenantd_http_requests_total"),
        "{anonymous}"
    );
    assert!(anonymous.contains("tenantd_http_held_bytes"), "{anonymous}");
    assert!(names_a_tenant(&scrape_as(&app, Some(TOKEN))));
    assert!(names_a_tenant(&scrape_as(&app, Some(metrics_token))));
    // The metrics token reaches nothing else; a tenant's token not the full view.
    let call = |token: &str, path: &str| {
        crate::support::tokens::call(&app.base(), Some(token), "GET", path, None)
    };
    call(metrics_token, "/api/tenants").assert_error(401, "invalid bearer token");
    let claims = crate::support::tokens::tenant(&tenant);
    let tenant_token =
        crate::support::tokens::hs256(crate::support::tokens::SECRET.as_bytes(), &claims);
    call(&tenant_token, "/metrics").assert_error(403, "metrics_token");

    // Not ready: why is for operators (and the log), not for anyone.
    proxy.cut();
    wait_until(Duration::from_secs(30), "not ready", || {
        app.get("/readyz").status == 503
    });
    let anonymous = app.get("/readyz");
    assert_eq!(anonymous.json(), json!({"error": "not ready"}));
    let operator = call(metrics_token, "/readyz");
    operator.assert_error(503, "message broker unavailable");
    let admin = call(TOKEN, "/readyz");
    admin.assert_error(503, "message broker unavailable");
    assert!(!crate::support::logs::lines_with(&[
        "GET /readyz -> 503",
        "not ready: message broker unavailable"
    ])
    .is_empty());
    proxy.restore();
}
