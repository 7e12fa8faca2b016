//! Tenant-scoped access: a tenant's JWT reaches its own tenant and nothing else; tokens that do
//! not verify get 401; `API_TOKEN` stays an admin credential; refusals are logged without the
//! token. (What an operator sets up for it is in `auth_setup.rs`.)

use serde_json::{json, Value};

use crate::support::http::request_with;
use crate::support::logs::lines_with;
use crate::support::tokens::{self, call, KeyPair, SECRET};
use crate::support::TestApp;

pub const API_TOKEN: &str = "tenantd-tests-admin-token-of-at-least-32-bytes";

/// What a tenant's own token may do, as docs/access.md's table says; every other documented
/// operation answers it 403.
const TENANT_MAY: &[(&str, &str)] = &[
    ("GET", "/api/openapi.json"),
    ("GET", "/api/tenants/{id}"),
    ("POST", "/api/tenants/{id}/messages"),
    ("GET", "/api/tenants/{id}/messages"),
    ("GET", "/api/tenants/{id}/dead-letters"),
    ("POST", "/api/tenants/{id}/dead-letters/replay"),
];

/// tenantd verifying HS256 tokens, with `API_TOKEN` for the admin's own calls.
fn spawn_hs256() -> TestApp {
    TestApp::spawn_with(|c| {
        c.api_token = Some(API_TOKEN.into());
        c.jwt_hs256_secret = Some(SECRET.into());
    })
}

pub fn create_tenant(base: &str, admin: &str, name: &str) -> String {
    let body = json!({ "name": name }).to_string();
    let reply = call(base, Some(admin), "POST", "/api/tenants", Some(&body));
    assert_eq!(reply.status, 201, "{}", reply.text());
    reply.json()["id"].as_str().unwrap().to_string()
}

/// Every operation the OpenAPI document names: method and path template. Those under `/api`
/// must declare the bearer scheme and document the 401 and 403 they may answer.
fn documented_operations() -> Vec<(String, String)> {
    let doc: Value = serde_json::from_str(include_str!("../../src/http/openapi.json")).unwrap();
    let mut operations = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "patch", "delete"] {
            let Some(op) = item.get(method) else { continue };
            if template.starts_with("/api/") && template != "/api/openapi.json" {
                assert_eq!(
                    op["security"],
                    json!([{"bearer": []}]),
                    "{method} {template}"
                );
                for status in ["401", "403"] {
                    let documented = op["responses"][status]["$ref"].as_str();
                    assert!(documented.is_some(), "{method} {template}: no {status}");
                }
            }
            operations.push((method.to_uppercase(), template.clone()));
        }
    }
    operations
}

#[test]
fn a_tenant_token_is_refused_on_every_route_of_another_tenant_and_every_admin_route() {
    let app = spawn_hs256();
    let base = app.base();
    let a = create_tenant(&base, API_TOKEN, "a");
    let b = create_tenant(&base, API_TOKEN, "b");
    let token_a = tokens::hs256(SECRET.as_bytes(), &tokens::tenant(&a));
    let before_b = call(
        &base,
        Some(API_TOKEN),
        "GET",
        &format!("/api/tenants/{b}"),
        None,
    );
    let nobody = uuid::Uuid::new_v4().to_string();
    let body = r#"{"workers": 5, "name": "taken over", "status": "inactive"}"#;
    let mut refused = 0;
    for (method, template) in documented_operations() {
        if !template.starts_with("/api/") {
            continue;
        }
        let own = TENANT_MAY.contains(&(method.as_str(), template.as_str()));
        // Another tenant's id, and one of no tenant at all: 403 both, so a token cannot tell
        // which tenants exist.
        for other in [&b, &nobody] {
            if template.contains("{id}") || !own {
                let path = template.replace("{id}", other);
                call(&base, Some(&token_a), &method, &path, Some(body)).assert_forbidden();
                refused += 1;
            }
        }
        // Its own id on an admin route.
        if !own {
            let path = template.replace("{id}", &a);
            call(&base, Some(&token_a), &method, &path, Some(body)).assert_forbidden();
        }
        // And no token at all: 401, a bare challenge (nothing was presented to be invalid).
        let anonymous = call(
            &base,
            None,
            &method,
            &template.replace("{id}", &a),
            Some(body),
        );
        anonymous.assert_error(401, "missing bearer token");
        assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));
    }
    assert!(
        refused >= 15,
        "only {refused} refusals: the document lost routes?"
    );
    // `/api/messages` needs the tenant's own `tenant_id`.
    for query in [
        "",
        "?limit=5",
        &format!("?tenant_id={b}"),
        &format!("?tenant_id={nobody}"),
    ] {
        let path = format!("/api/messages{query}");
        call(&base, Some(&token_a), "GET", &path, None).assert_forbidden();
    }
    // Nothing changed, as the admin sees it.
    let after_b = call(
        &base,
        Some(API_TOKEN),
        "GET",
        &format!("/api/tenants/{b}"),
        None,
    );
    assert_eq!(after_b.json()["workers"], before_b.json()["workers"]);
    assert_eq!(after_b.json()["name"], "b");
    assert_eq!(after_b.json()["status"], "active");
    let a_now = call(
        &base,
        Some(API_TOKEN),
        "GET",
        &format!("/api/tenants/{a}"),
        None,
    );
    assert_eq!(
        (
            a_now.json()["name"].clone(),
            a_now.json()["workers"].clone()
        ),
        (json!("a"), json!(3))
    );
    let listed = call(&base, Some(API_TOKEN), "GET", "/api/tenants", None);
    assert_eq!(listed.json()["data"].as_array().unwrap().len(), 2);
    assert_eq!(app.partition_rows(&b), 0);
}

#[test]
fn a_tenant_token_reads_and_publishes_to_its_own_tenant() {
    let app = spawn_hs256();
    let base = app.base();
    let a = create_tenant(&base, API_TOKEN, "a");
    let b = create_tenant(&base, API_TOKEN, "b");
    let post = |tenant: &str, body: &str| {
        let path = format!("/api/tenants/{tenant}/messages");
        call(&base, Some(API_TOKEN), "POST", &path, Some(body)).status
    };
    assert_eq!(post(&b, r#"{"secret of": "b"}"#), 202);
    let token = tokens::hs256(SECRET.as_bytes(), &tokens::tenant(&a));
    let own = |method: &str, path: String, body: Option<&str>| {
        call(&base, Some(&token), method, &path, body)
    };
    let tenant = own("GET", format!("/api/tenants/{a}"), None);
    assert_eq!(tenant.status, 200, "{}", tenant.text());
    assert_eq!(tenant.json()["id"], a.as_str());
    let published = own(
        "POST",
        format!("/api/tenants/{a}/messages"),
        Some(r#"{"n": 1}"#),
    );
    assert_eq!(published.status, 202, "{}", published.text());
    app.wait_rows(&a, 1);
    app.wait_rows(&b, 1);
    let page = own("GET", format!("/api/tenants/{a}/messages"), None);
    assert_eq!(page.status, 200);
    assert_eq!(page.json()["data"][0]["payload"], json!({ "n": 1 }));
    assert_eq!(own("GET", "/api/openapi.json".into(), None).status, 200);
    // Its own walk over `/api/messages`, however the query is dressed up, never reaches B.
    let b_simple = b.replace('-', "");
    let queries = [
        format!("tenant_id={a}"),
        format!("tenant_id={a}&tenant_id={b}"),
        format!("tenant_id={a}&cursor=t.{b_simple}"),
        format!("tenant_id={a}&cursor=m.{b_simple}.0.{b_simple}"),
    ];
    for query in queries {
        let page = own("GET", format!("/api/messages?{query}"), None);
        assert_eq!(page.status, 200, "{query}: {}", page.text());
        for row in page.json()["data"].as_array().unwrap() {
            assert_eq!(row["tenant_id"], a.as_str(), "{query}");
        }
    }
    let walk = own("GET", format!("/api/messages?tenant_id={a}"), None);
    assert_eq!(walk.json()["data"].as_array().unwrap().len(), 1);
}

/// tenantd verifying RS256 tokens from `key`, which must name this issuer and audience.
fn spawn_with_key(key: &KeyPair) -> TestApp {
    let file = key.public_file();
    TestApp::spawn_with(move |c| {
        c.jwt_public_key_file = Some(file);
        c.jwt_issuer = Some("https://id.example.test".into());
        c.jwt_audience = Some("tenantd".into());
    })
}

/// Claims `spawn_with_key`'s tenantd accepts.
fn addressed(claims: Value) -> Value {
    tokens::with(
        claims,
        json!({ "iss": "https://id.example.test", "aud": "tenantd" }),
    )
}

#[test]
fn forged_expired_and_misaddressed_tokens_get_401_invalid_token() {
    let key = KeyPair::rsa();
    let app = spawn_with_key(&key);
    let base = app.base();
    let admin = key.sign(&addressed(tokens::admin()));
    let get = |token: &str| call(&base, Some(token), "GET", "/api/tenants", None);
    assert_eq!(get(&admin).status, 200, "{}", get(&admin).text());
    let now = tokens::now();
    let claims = |changes: Value| tokens::with(addressed(tokens::admin()), changes);
    let other_key = KeyPair::rsa();
    let cases = [
        ("garbage", "not-a-jwt".to_string(), "not a JWT"),
        (
            "alg none",
            tokens::unsigned(&claims(json!({}))),
            "malformed",
        ),
        (
            "HS256 signed with the RS256 public key's PEM bytes",
            tokens::hs256(&key.public_pem, &claims(json!({}))),
            "algorithm",
        ),
        (
            "signed by another key",
            other_key.sign(&claims(json!({}))),
            "signature",
        ),
        (
            "expired an hour ago",
            key.sign(&claims(json!({ "exp": now - 3600 }))),
            "expired",
        ),
        (
            "no exp",
            key.sign(&claims(json!({ "exp": null }))),
            "no exp",
        ),
        (
            "nbf an hour ahead",
            key.sign(&claims(json!({ "nbf": now + 3600 }))),
            "not valid yet",
        ),
        (
            "wrong aud",
            key.sign(&claims(json!({ "aud": "another-api" }))),
            "audience",
        ),
        (
            "no aud",
            key.sign(&claims(json!({ "aud": null }))),
            "no aud",
        ),
        (
            "wrong iss",
            key.sign(&claims(json!({ "iss": "https://evil.test" }))),
            "issuer",
        ),
        (
            "no iss",
            key.sign(&claims(json!({ "iss": null }))),
            "no iss",
        ),
        ("a signature altered", altered(&admin), "signature"),
    ];
    for (what, token, why) in cases {
        let reply = get(&token);
        assert_eq!(reply.status, 401, "{what}: {}", reply.text());
        reply.assert_invalid_token(why);
    }
    // Within the leeway (30 s by default), a clock slightly behind or ahead is forgiven.
    let skewed = claims(json!({ "exp": now - 10, "nbf": now + 10 }));
    assert_eq!(get(&key.sign(&skewed)).status, 200);
    let missing = call(&base, None, "GET", "/api/tenants", None);
    missing.assert_error(401, "missing bearer token");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
}

/// `token` with one character of its signature changed.
fn altered(token: &str) -> String {
    let at = token.rfind('.').unwrap() + 10;
    let swap = if &token[at..=at] == "A" { "B" } else { "A" };
    format!("{}{swap}{}", &token[..at], &token[at + 1..])
}

#[test]
fn an_es256_key_verifies_es256_tokens_and_nothing_else() {
    let key = KeyPair::p256();
    let app = spawn_with_key(&key);
    let base = app.base();
    let admin = key.sign(&addressed(tokens::admin()));
    let a = create_tenant(&base, &admin, "a");
    let b = create_tenant(&base, &admin, "b");
    let token_a = key.sign(&addressed(tokens::tenant(&a)));
    let get = |token: &str, path: &str| call(&base, Some(token), "GET", path, None);
    assert_eq!(get(&token_a, &format!("/api/tenants/{a}")).status, 200);
    get(&token_a, &format!("/api/tenants/{b}")).assert_forbidden();
    get(&token_a, "/api/tenants").assert_forbidden();
    let path = format!("/api/tenants/{a}");
    let forged = [
        KeyPair::p256().sign(&addressed(tokens::admin())),
        KeyPair::rsa().sign(&addressed(tokens::admin())),
        tokens::hs256(&key.public_pem, &addressed(tokens::tenant(&a))),
    ];
    for token in forged {
        assert_eq!(get(&token, &path).status, 401);
    }
}

#[test]
fn hs256_tokens_and_api_token_work_side_by_side_and_probes_stay_open() {
    let app = spawn_hs256();
    let base = app.base();
    let tenant = create_tenant(&base, API_TOKEN, "t");
    let get = |token: Option<&str>, path: &str| call(&base, token, "GET", path, None);
    let admin = tokens::hs256(SECRET.as_bytes(), &tokens::admin());
    assert_eq!(get(Some(&admin), "/api/replicas").status, 200);
    assert_eq!(get(Some(API_TOKEN), "/api/replicas").status, 200);
    let lower = request_with(
        &base,
        "GET",
        "/api/replicas",
        &[("Authorization", &format!("bearer {admin}"))],
        None,
    );
    assert_eq!(lower.status, 200, "the scheme is case-insensitive");
    let claims = |changes: Value| tokens::with(tokens::admin(), changes);
    let sign = |claims: Value| tokens::hs256(SECRET.as_bytes(), &claims);
    let refused = [
        (
            tokens::hs256(
                b"another secret of at least thirty-two bytes",
                &tokens::admin(),
            ),
            "signature",
        ),
        (sign(claims(json!({ "role": "root" }))), "role"),
        (sign(claims(json!({ "role": null }))), "role"),
        (
            sign(claims(json!({ "tenant_id": tenant }))),
            "admin token carries no tenant_id",
        ),
        (
            sign(claims(json!({ "role": "tenant" }))),
            "needs a tenant_id",
        ),
        (
            sign(claims(json!({ "role": "tenant", "tenant_id": "t-1" }))),
            "not a tenant id",
        ),
        (sign(claims(json!({ "aud": "tenantd" }))), "audience"),
        (format!("{API_TOKEN}x"), "neither the API token nor a JWT"),
    ];
    for (token, why) in refused {
        get(Some(&token), "/api/replicas").assert_invalid_token(why);
    }
    let basic = request_with(
        &base,
        "GET",
        "/api/replicas",
        &[("Authorization", "Basic dTpw")],
        None,
    );
    basic.assert_invalid_token("not a bearer token");
    // Probes and metrics ask for nothing; liveness ignores what is sent, readiness and
    // metrics check it (it asks for their full view).
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(None, path).status, 200, "{path}");
    }
    assert_eq!(get(Some("garbage"), "/healthz").status, 200);
    for path in ["/readyz", "/metrics"] {
        get(Some("garbage"), path).assert_invalid_token("neither the API token nor a JWT");
    }
}

#[test]
fn refusals_are_logged_with_request_id_route_and_reason_but_never_the_token() {
    let app = spawn_hs256();
    let base = app.base();
    let tenant = create_tenant(&base, API_TOKEN, "logged");
    let token = tokens::hs256(SECRET.as_bytes(), &tokens::tenant(&tenant));
    let expired = tokens::hs256(
        SECRET.as_bytes(),
        &tokens::with(
            tokens::tenant(&tenant),
            json!({ "exp": tokens::now() - 3600 }),
        ),
    );
    let send = |token: &str, method: &str, path: &str, request_id: &str| {
        let bearer = format!("Bearer {token}");
        let headers = [
            ("Authorization", bearer.as_str()),
            ("X-Request-Id", request_id),
        ];
        request_with(&base, method, path, &headers, None)
    };
    let forbidden = send(
        &token,
        "DELETE",
        &format!("/api/tenants/{tenant}"),
        "deny-forbidden-1",
    );
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.header("x-request-id"), Some("deny-forbidden-1"));
    let unauthorized = send(&expired, "GET", "/api/tenants", "deny-expired-1");
    assert_eq!(unauthorized.status, 401);
    let forbidden_line = [
        "request_id=deny-forbidden-1",
        "-> 403",
        "denied on DELETE /api/tenants/{id}",
        "needs an admin credential",
    ];
    assert_eq!(lines_with(&forbidden_line).len(), 1);
    let expired_line = [
        "request_id=deny-expired-1",
        "-> 401",
        "denied on GET /api/tenants",
        "expired",
    ];
    assert_eq!(lines_with(&expired_line).len(), 1);
    for secret in [&token, &expired, SECRET, API_TOKEN] {
        // Any part of a token (its signature, say) would do to find it.
        let tail = &secret[secret.len() - 16..];
        assert_eq!(lines_with(&[tail]), Vec::<String>::new());
    }
}
