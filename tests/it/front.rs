//! The HTTP front as an operator relies on it: token auth, request ids, media types.

use crate::support::http::request_with;
use crate::support::logs::lines_with;
use crate::support::TestApp;

#[test]
fn with_a_token_every_api_request_needs_it_and_the_probes_stay_open() {
    let app = TestApp::spawn_with(|c| c.api_token = Some("s3cret-token".into()));
    let base = app.base();
    let get = |path: &str, auth: Option<&str>| {
        let mut headers = vec![];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        request_with(&base, "GET", path, &headers, None)
    };
    let missing = get("/api/tenants", None);
    missing.assert_error(401, "bearer token");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    get("/api/tenants", Some("Bearer wrong")).assert_error(401, "bearer token");
    get("/api/tenants", Some("Bearer s3cret-token-and-more")).assert_error(401, "bearer token");
    get("/api/tenants", Some("s3cret-token")).assert_error(401, "bearer token");
    get("/api/nothing", None).assert_error(401, "bearer token");
    assert_eq!(get("/api/tenants", Some("Bearer s3cret-token")).status, 200);
    assert_eq!(get("/healthz", None).status, 200);
    assert_eq!(get("/readyz", None).status, 200);
}

#[test]
fn every_response_carries_a_request_id_that_tags_its_log_lines() {
    let app = TestApp::spawn();
    let json = ("Content-Type", "application/json");
    let given = request_with(
        &app.base(),
        "POST",
        "/api/tenants",
        &[json, ("X-Request-Id", "req-42")],
        Some(br#"{"name":"traced"}"#),
    );
    assert_eq!(given.status, 201);
    assert_eq!(given.header("x-request-id"), Some("req-42"));
    let tenant = given.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        lines_with(&["request_id=req-42", "tenant created", &tenant]).len(),
        1
    );
    assert_eq!(
        lines_with(&["request_id=req-42", "POST /api/tenants -> 201"]).len(),
        1
    );

    let fresh = app.get("/api/tenants");
    let id = fresh
        .header("x-request-id")
        .expect("a request id")
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    let odd = request_with(
        &app.base(),
        "GET",
        "/healthz",
        &[("X-Request-Id", "bad id with spaces")],
        None,
    );
    assert_ne!(odd.header("x-request-id"), Some("bad id with spaces"));
}

#[test]
fn a_body_that_says_it_is_not_json_is_refused_with_415() {
    let app = TestApp::spawn();
    let post = |content_type: &str| {
        request_with(
            &app.base(),
            "POST",
            "/api/tenants",
            &[("Content-Type", content_type)],
            Some(br#"{"name":"x"}"#),
        )
    };
    post("text/plain").assert_error(415, "application/json");
    post("application/x-www-form-urlencoded").assert_error(415, "application/json");
    assert_eq!(post("application/json; charset=utf-8").status, 201);
    let none = request_with(
        &app.base(),
        "POST",
        "/api/tenants",
        &[],
        Some(br#"{"name":"y"}"#),
    );
    assert_eq!(none.status, 201, "no Content-Type is taken as JSON");
    assert_eq!(app.tenant_ids().len(), 2);
}
