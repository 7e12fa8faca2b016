//! Routing and request parsing: turns an `ApiRequest` into a call on `Service`, and its answer
//! into a status and JSON. Every way a request can be wrong is a 4xx here, before any work.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tiny_http::Method;

use super::error::ApiError;
use super::{ApiRequest, ApiResponse, Body};
use crate::ids::TenantId;
use crate::model::Status;
use crate::service::{Changed, NewTenant, Service, TenantPatch};

const MAX_NAME_CHARS: usize = 200;
const MAX_DESCRIPTION_CHARS: usize = 2000;
const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 100;

/// The resources, recognised by path alone, so a known path with a wrong method is a 405.
/// Who may call each is decided in `auth::scope`.
pub enum Route {
    Health,
    Ready,
    Metrics,
    OpenApi,
    Tenants,
    Tenant(String),
    Concurrency(String),
    TenantMessages(String),
    DeadLetters(String),
    Replay(String),
    Messages,
    Replicas,
}

impl Route {
    pub fn parse(path: &str) -> Option<Route> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let route = match segments.as_slice() {
            ["healthz"] => Route::Health,
            ["readyz"] => Route::Ready,
            ["metrics"] => Route::Metrics,
            ["api", "openapi.json"] => Route::OpenApi,
            ["api", "tenants"] => Route::Tenants,
            ["api", "tenants", id] => Route::Tenant(id.to_string()),
            ["api", "tenants", id, "config", "concurrency"] => Route::Concurrency(id.to_string()),
            ["api", "tenants", id, "messages"] => Route::TenantMessages(id.to_string()),
            ["api", "tenants", id, "dead-letters"] => Route::DeadLetters(id.to_string()),
            ["api", "tenants", id, "dead-letters", "replay"] => Route::Replay(id.to_string()),
            ["api", "messages"] => Route::Messages,
            ["api", "replicas"] => Route::Replicas,
            _ => return None,
        };
        Some(route)
    }

    /// The route's template, the `route` label of the HTTP metrics.
    pub fn template(&self) -> &'static str {
        match self {
            Route::Health => "/healthz",
            Route::Ready => "/readyz",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/api/openapi.json",
            Route::Tenants => "/api/tenants",
            Route::Tenant(_) => "/api/tenants/{id}",
            Route::Concurrency(_) => "/api/tenants/{id}/config/concurrency",
            Route::TenantMessages(_) => "/api/tenants/{id}/messages",
            Route::DeadLetters(_) => "/api/tenants/{id}/dead-letters",
            Route::Replay(_) => "/api/tenants/{id}/dead-letters/replay",
            Route::Messages => "/api/messages",
            Route::Replicas => "/api/replicas",
        }
    }

    pub fn allowed(&self) -> &'static [&'static str] {
        match self {
            Route::Health
            | Route::Ready
            | Route::Metrics
            | Route::OpenApi
            | Route::Messages
            | Route::Replicas => &["GET"],
            Route::Tenants | Route::TenantMessages(_) => &["GET", "POST"],
            Route::Tenant(_) => &["GET", "PATCH", "DELETE"],
            Route::Concurrency(_) => &["PUT"],
            Route::DeadLetters(_) => &["GET", "DELETE"],
            Route::Replay(_) => &["POST"],
        }
    }
}

/// The route template a path belongs to, or `other`.
pub fn label(path: &str) -> &'static str {
    Route::parse(path).map_or("other", |r| r.template())
}

/// Answers a request for `route` (as `Route::parse` read its path).
pub fn route(
    service: &Service,
    route: Option<&Route>,
    req: ApiRequest,
) -> Result<ApiResponse, ApiError> {
    let route = route.ok_or_else(|| ApiError::NotFound(format!("no such path: {}", req.path)))?;
    let not_allowed = || ApiError::MethodNotAllowed(route.allowed());
    match (&req.method, route) {
        (Method::Get, Route::Health) => ok(200, json!({ "status": "ok" })),
        (Method::Get, Route::Ready) => match service.readiness() {
            Ok(()) => ok(200, json!({ "status": "ready" })),
            Err(why) if req.operator => Err(ApiError::Unavailable(why)),
            Err(why) => Err(ApiError::NotReady(why)),
        },
        (Method::Get, Route::OpenApi) => Ok(ApiResponse {
            status: 200,
            body: Body::Json(OPENAPI.to_string()),
        }),
        (Method::Get, Route::Metrics) => Ok(ApiResponse {
            status: 200,
            body: Body::Metrics(service.metrics_text(req.operator)),
        }),
        (Method::Get, Route::Replicas) => ok(200, json!({ "data": service.replicas()? })),
        (Method::Post, Route::Tenants) => {
            let new = parse_new_tenant(&req.body)?;
            ok(201, service.create_tenant(new)?)
        }
        (Method::Get, Route::Tenants) => {
            let (cursor, limit) = page_params(&req.query)?;
            ok(200, service.list_tenants(cursor.as_deref(), limit)?)
        }
        (Method::Get, Route::Tenant(id)) => ok(200, service.tenant_view(tenant_id(id)?)?),
        (Method::Patch, Route::Tenant(id)) => {
            let id = tenant_id(id)?;
            let patch = parse_patch(&req.body)?;
            changed(service.update_tenant(id, patch)?)
        }
        (Method::Delete, Route::Tenant(id)) => {
            service.delete_tenant(tenant_id(id)?)?;
            Ok(ApiResponse {
                status: 204,
                body: Body::Empty,
            })
        }
        (Method::Put, Route::Concurrency(id)) => {
            let id = tenant_id(id)?;
            let workers = parse_workers(&req.body, service.max_workers())?;
            changed(service.set_concurrency(id, workers)?)
        }
        (Method::Post, Route::TenantMessages(id)) => {
            let id = tenant_id(id)?;
            parse_json::<serde::de::IgnoredAny>(&req.body)?;
            let message_id = service.publish(id, &req.body)?;
            ok(202, json!({ "id": message_id, "queue": id.queue_name() }))
        }
        (Method::Get, Route::TenantMessages(id)) => {
            let id = tenant_id(id)?;
            let (cursor, limit) = page_params(&req.query)?;
            ok(200, service.tenant_messages(id, cursor.as_deref(), limit)?)
        }
        (Method::Get, Route::DeadLetters(id)) => {
            let id = tenant_id(id)?;
            let (cursor, limit) = page_params(&req.query)?;
            ok(
                200,
                service.dead_letters(id, cursor.as_deref(), limit as u64)?,
            )
        }
        (Method::Post, Route::Replay(id)) => {
            let id = tenant_id(id)?;
            let limit = parse_how_many(&req.body)?;
            ok(200, service.replay_dead_letters(id, limit)?)
        }
        (Method::Delete, Route::DeadLetters(id)) => {
            let id = tenant_id(id)?;
            let limit = parse_how_many(&req.body)?;
            ok(200, service.drop_dead_letters(id, limit)?)
        }
        (Method::Get, Route::Messages) => {
            let (cursor, limit) = page_params(&req.query)?;
            let only = match query_param(&req.query, "tenant_id") {
                Some(id) => Some(tenant_id(&id)?),
                None => None,
            };
            ok(200, service.all_messages(cursor.as_deref(), limit, only)?)
        }
        _ => Err(not_allowed()),
    }
}

/// A change is answered 200 once the replica running the tenant applied it, 202 when it was
/// saved but not yet applied within the wait (it will be).
fn changed(changed: Changed) -> Result<ApiResponse, ApiError> {
    ok(if changed.applied { 200 } else { 202 }, changed.tenant)
}

/// The API's contract, served as written (the contract test holds it to the routes).
const OPENAPI: &str = include_str!("openapi.json");

fn ok(status: u16, body: impl serde::Serialize) -> Result<ApiResponse, ApiError> {
    let body = serde_json::to_string(&body).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(ApiResponse {
        status,
        body: Body::Json(body),
    })
}

fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a tenant id (a UUID)")))
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "request body must be JSON; it is empty".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// The statuses a client may ask for (`deleting` is DELETE's own).
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Wanted {
    Active,
    Inactive,
}

impl From<Wanted> for Status {
    fn from(w: Wanted) -> Status {
        match w {
            Wanted::Active => Status::Active,
            Wanted::Inactive => Status::Inactive,
        }
    }
}

/// A field that may be left out but, when given, must not be `null`.
fn not_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    match Option::<T>::deserialize(d)? {
        Some(value) => Ok(Some(value)),
        None => Err(serde::de::Error::invalid_type(
            serde::de::Unexpected::Unit,
            &"a value (leave the field out to keep it as it is)",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    status: Option<Wanted>,
}

fn parse_new_tenant(body: &[u8]) -> Result<NewTenant, ApiError> {
    let body: CreateBody = parse_json(body)?;
    check_text("name", &body.name, MAX_NAME_CHARS)?;
    if let Some(d) = &body.description {
        check_text("description", d, MAX_DESCRIPTION_CHARS)?;
    }
    Ok(NewTenant {
        name: body.name,
        description: body.description,
        status: body.status.map_or(Status::Active, Status::from),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default, deserialize_with = "not_null")]
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "not_null")]
    status: Option<Wanted>,
}

/// Tells `"description": null` (clear it) from an absent field (keep it).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

fn parse_patch(body: &[u8]) -> Result<TenantPatch, ApiError> {
    let body: PatchBody = parse_json(body)?;
    if let Some(name) = &body.name {
        check_text("name", name, MAX_NAME_CHARS)?;
    }
    if let Some(Some(d)) = &body.description {
        check_text("description", d, MAX_DESCRIPTION_CHARS)?;
    }
    Ok(TenantPatch {
        name: body.name,
        description: body.description,
        status: body.status.map(Status::from),
    })
}

fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if field == "name" && value.is_empty() {
        return Err(ApiError::BadRequest("name must not be empty".into()));
    }
    if chars > max_chars {
        return Err(ApiError::BadRequest(format!(
            "{field} must be at most {max_chars} characters; it has {chars}"
        )));
    }
    if value.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "{field} must not contain NUL characters"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConcurrencyBody {
    workers: Value,
}

fn parse_workers(body: &[u8], max: u16) -> Result<u16, ApiError> {
    let body: ConcurrencyBody = parse_json(body)?;
    body.workers
        .as_u64()
        .filter(|n| (1..=u64::from(max)).contains(n))
        .map(|n| n as u16)
        .ok_or_else(|| {
            ApiError::BadRequest(format!("workers must be an integer between 1 and {max}"))
        })
}

/// The most dead letters one replay or drop may be asked for.
const MAX_MOVE: u64 = 1_000_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HowManyBody {
    #[serde(default, deserialize_with = "not_null")]
    limit: Option<Value>,
}

/// `{"limit": N}` for N dead letters; `{}` or no body at all for every one.
fn parse_how_many(body: &[u8]) -> Result<Option<u64>, ApiError> {
    if body.is_empty() {
        return Ok(None);
    }
    // An object only: serde would take a struct from an array too (`[5]`).
    let body = match parse_json::<Value>(body)? {
        object @ Value::Object(_) => serde_json::from_value::<HowManyBody>(object)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?,
        _ => {
            return Err(ApiError::BadRequest(
                "request body must be a JSON object".into(),
            ))
        }
    };
    let Some(limit) = body.limit else {
        return Ok(None);
    };
    limit
        .as_u64()
        .filter(|n| (1..=MAX_MOVE).contains(n))
        .map(Some)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "limit must be an integer between 1 and {MAX_MOVE} (leave it out for all)"
            ))
        })
}

/// The first value of a query parameter, decoded (`+` as space, `%XX` escapes).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn page_params(query: &str) -> Result<(Option<String>, usize), ApiError> {
    let cursor = query_param(query, "cursor");
    let limit = match query_param(query, "limit") {
        None => DEFAULT_LIMIT,
        Some(raw) => raw
            .parse()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "limit must be an integer between 1 and {MAX_LIMIT}"
                ))
            })?,
    };
    Ok((cursor, limit))
}
