//! The OpenAPI document is the contract: it names exactly the routes and methods tenantd
//! answers, its references resolve, and real responses carry exactly the fields its schemas
//! declare. (schemathesis, run by scripts/test.sh, checks every response against it too.)

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::support::TestApp;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

fn document(app: &TestApp) -> Value {
    let served = app.get("/api/openapi.json");
    assert_eq!(served.status, 200);
    let doc = served.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    doc
}

#[test]
fn the_document_names_exactly_the_routes_and_answers_of_the_router() {
    let app = TestApp::spawn();
    let doc = document(&app);
    let paths = doc["paths"].as_object().unwrap();
    let unknown = uuid::Uuid::new_v4().to_string();
    for (template, item) in paths {
        let path = template.replace("{id}", &unknown);
        for method in METHODS {
            let documented = item.get(method.to_lowercase()).is_some();
            let reply = app.request(method, &path, Some("{}"));
            let routed = reply.status != 405 && !reply.text().contains("no such path");
            assert_eq!(routed, documented, "{method} {template}: {}", reply.text());
            if documented {
                let status = reply.status.to_string();
                let responses = &item[method.to_lowercase()]["responses"];
                assert!(
                    responses.get(&status).is_some(),
                    "{method} {template} answered undocumented {status}"
                );
            }
        }
    }
}

/// Every `"$ref"` in `value`.
fn refs(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => found.push(r.clone()),
                    _ => refs(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

/// The schema a `#/components/schemas/...` reference names.
fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let path = reference.strip_prefix("#/").expect("a local reference");
    path.split('/').fold(doc, |v, part| &v[part])
}

/// The properties a schema declares, following `allOf` and references.
fn properties(doc: &Value, schema: &Value) -> BTreeSet<String> {
    if let Some(r) = schema["$ref"].as_str() {
        return properties(doc, resolve(doc, r));
    }
    let mut names: BTreeSet<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        names.extend(properties(doc, part));
    }
    names
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn references_resolve_and_responses_carry_exactly_the_documented_fields() {
    let app = TestApp::spawn();
    let doc = document(&app);
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in &found {
        assert!(!resolve(&doc, r).is_null(), "{r} resolves to nothing");
    }

    let created = app.create_tenant_with(json!({"name": "documented"}));
    let schema = |path: &str, method: &str, status: &str| {
        &doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    };
    let post = schema("/api/tenants", "post", "201");
    assert_eq!(
        keys(&created),
        properties(&doc, post),
        "POST /api/tenants 201"
    );
    assert_eq!(
        keys(&created["consumer"]),
        properties(&doc, &doc["components"]["schemas"]["Consumer"]),
        "the consumer"
    );
    let id = created["id"].as_str().unwrap();
    let view = app.get(&format!("/api/tenants/{id}")).json();
    let get = schema("/api/tenants/{id}", "get", "200");
    assert_eq!(
        keys(&view),
        properties(&doc, get),
        "GET /api/tenants/{{id}} 200"
    );
    let replicas = app.get("/api/replicas").json();
    let listed = schema("/api/replicas", "get", "200");
    assert_eq!(keys(&replicas), properties(&doc, listed));
    let replica = &doc["components"]["schemas"]["Replica"];
    assert_eq!(keys(&replicas["data"][0]), properties(&doc, replica));
    let error = app.get("/api/tenants/nope").json();
    assert_eq!(
        keys(&error),
        properties(&doc, &doc["components"]["schemas"]["Error"])
    );
}
