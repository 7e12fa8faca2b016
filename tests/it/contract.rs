//! The OpenAPI document is the contract: served as written, and naming exactly the routes and
//! methods tenantd answers. (schemathesis, run by scripts/test.sh, checks the responses.)

use serde_json::Value;

use crate::support::TestApp;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

#[test]
fn the_served_document_is_the_one_in_the_repo_and_matches_the_routes() {
    let app = TestApp::spawn();
    let served = app.get("/api/openapi.json");
    assert_eq!(served.status, 200);
    let in_repo: Value = serde_json::from_str(include_str!("../../src/http/openapi.json")).unwrap();
    assert_eq!(served.json(), in_repo);
    assert!(in_repo["openapi"].as_str().unwrap().starts_with("3."));

    let paths = in_repo["paths"].as_object().unwrap();
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
