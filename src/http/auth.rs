//! Who may call what. A credential (`API_TOKEN`, or a JWT checked against the configured keys)
//! becomes a `Caller`, and `scope` says which callers each route admits: the one place that
//! answers 401 or 403, so a new route gets its rule here or does not compile. `METRICS_TOKEN`
//! reaches the operator's view of `/metrics` and `/readyz` and nothing else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tiny_http::Method;

use super::error::ApiError;
use super::routes::{query_param, Route};
use crate::ids::TenantId;

/// The `API_TOKEN` and `JWT_*` settings.
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    pub api_token: Option<String>,
    pub metrics_token: Option<String>,
    pub hs256_secret: Option<String>,
    pub public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// Who is calling, once a credential checked out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Caller {
    /// `API_TOKEN`, or a JWT with `role: admin`.
    Admin,
    /// A JWT with `role: tenant`: its own tenant's routes only.
    Tenant(TenantId),
}

/// Who a request was admitted as.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Who {
    /// No credential is configured: everyone is an admin.
    Anyone,
    /// No credential, on a route that needs none.
    Anonymous,
    Admin,
    Tenant(TenantId),
    /// `METRICS_TOKEN`, on `/metrics` or `/readyz`.
    Monitor,
}

impl Who {
    /// Whether the caller sees what only operators may: every tenant's series in `/metrics`,
    /// what keeps the replica from being ready.
    pub fn is_operator(self) -> bool {
        matches!(self, Who::Anyone | Who::Admin | Who::Monitor)
    }
}

/// Which callers a request admits.
enum Scope {
    /// Liveness (and paths outside `/api` that lead nowhere): no credential looked at.
    Open,
    /// Readiness and metrics: anyone, in a view naming no tenant and no internal error; in
    /// full for an admin or `METRICS_TOKEN` (any other credential is refused).
    Probe,
    /// Any valid credential.
    AnyCaller,
    /// An admin, or the tenant the request names (its path segment or `tenant_id`, exactly as
    /// the route reads it; `None` when it names none).
    Tenant(Option<String>),
    /// An admin only.
    Admin,
}

/// The permission table. A tenant's token reads its tenant, publishes to and pages through its
/// own messages, looks at and replays its own dead letters; everything else (dropping dead
/// letters included) needs an admin. Every route is listed, so adding one means
/// deciding here who may call it.
fn scope(method: &Method, route: Option<&Route>, path: &str, query: &str) -> Scope {
    let Some(route) = route else {
        return match path == "/api" || path.starts_with("/api/") {
            true => Scope::Admin,
            false => Scope::Open,
        };
    };
    match (route, method) {
        (Route::Health, _) => Scope::Open,
        (Route::Ready | Route::Metrics, _) => Scope::Probe,
        (Route::OpenApi, _) => Scope::AnyCaller,
        (Route::Tenant(id), Method::Get) => Scope::Tenant(Some(id.clone())),
        (Route::TenantMessages(id), Method::Get | Method::Post) => Scope::Tenant(Some(id.clone())),
        (Route::Messages, Method::Get) => Scope::Tenant(query_param(query, "tenant_id")),
        (Route::DeadLetters(id), Method::Get) => Scope::Tenant(Some(id.clone())),
        (Route::Replay(id), Method::Post) => Scope::Tenant(Some(id.clone())),
        (
            Route::Tenants
            | Route::Tenant(_)
            | Route::Concurrency(_)
            | Route::TenantMessages(_)
            | Route::Messages
            | Route::DeadLetters(_)
            | Route::Replay(_)
            | Route::Replicas,
            _,
        ) => Scope::Admin,
    }
}

/// One way a JWT may be signed: the key, and the checks (which name the one algorithm the
/// key verifies).
struct JwtKey {
    key: DecodingKey,
    validation: Validation,
}

/// The configured credentials; with none, every request is an admin's.
pub struct Auth {
    api_token: Option<String>,
    metrics_token: Option<String>,
    keys: Vec<JwtKey>,
    describe: String,
}

impl Auth {
    /// Reads the key file, if any; a key that cannot verify anything is a start-up error.
    pub fn new(settings: &AuthSettings) -> Result<Auth> {
        let mut keys = Vec::new();
        let mut methods = Vec::new();
        if settings.api_token.is_some() {
            methods.push("API_TOKEN (admin)".to_string());
        }
        if let Some(secret) = &settings.hs256_secret {
            let key = DecodingKey::from_secret(secret.as_bytes()).context("JWT_HS256_SECRET")?;
            keys.push(jwt_key(Algorithm::HS256, key, settings));
            methods.push("HS256 JWTs (JWT_HS256_SECRET)".into());
        }
        if let Some(path) = &settings.public_key_file {
            let (algorithm, key) = public_key(path)?;
            keys.push(jwt_key(algorithm, key, settings));
            methods.push(format!("{algorithm:?} JWTs ({})", path.display()));
        }
        let mut describe = methods.join(", ");
        if !keys.is_empty() {
            let issuer = settings.issuer.as_deref().unwrap_or("any");
            let audience = settings.audience.as_deref().unwrap_or("none");
            describe.push_str(&format!(
                "; JWT issuer {issuer}, audience {audience}, leeway {} s",
                settings.leeway.as_secs()
            ));
        }
        if settings.metrics_token.is_some() {
            describe.push_str("; METRICS_TOKEN for /metrics and /readyz");
        }
        Ok(Auth {
            api_token: settings.api_token.clone(),
            metrics_token: settings.metrics_token.clone(),
            keys,
            describe,
        })
    }

    /// No credential configured: the API is open to whoever reaches it.
    pub fn is_open(&self) -> bool {
        self.api_token.is_none() && self.keys.is_empty()
    }

    /// The one start-up line about access: how callers are checked, or that nobody is, loudly
    /// when the API is reachable beyond this host (`ALLOW_INSECURE_OPEN_API=1`).
    pub fn log_start(&self, addr: SocketAddr) {
        if !self.is_open() {
            info!("API access: {}", self.describe);
        } else if addr.ip().is_loopback() {
            info!(
                "API access: open, no credential configured (API_TOKEN, JWT_HS256_SECRET, \
                 JWT_PUBLIC_KEY_FILE); HTTP listens on loopback {addr} only"
            );
        } else {
            warn!(
                "API access: open to anyone who can reach {addr}, which is not a loopback \
                 address: they can read every tenant's messages, publish to any tenant and \
                 delete tenants (ALLOW_INSECURE_OPEN_API=1); set API_TOKEN, JWT_HS256_SECRET or \
                 JWT_PUBLIC_KEY_FILE, or bind HTTP_ADDR to 127.0.0.1"
            );
        }
    }

    /// Admits the request as whom, or says why not: 401 when the credential is missing or
    /// does not verify, 403 when it does not reach this route.
    pub fn authorize(
        &self,
        method: &Method,
        route: Option<&Route>,
        path: &str,
        query: &str,
        authorization: Option<&str>,
    ) -> Result<Who, ApiError> {
        let scope = scope(method, route, path, query);
        if self.is_open() {
            return Ok(Who::Anyone);
        }
        match (&scope, authorization) {
            (Scope::Open, _) | (Scope::Probe, None) => return Ok(Who::Anonymous),
            (Scope::Probe, Some(header)) if self.is_metrics_token(header) => {
                return Ok(Who::Monitor)
            }
            _ => {}
        }
        let own = match self.authenticate(authorization)? {
            Caller::Admin => return Ok(Who::Admin),
            Caller::Tenant(own) => own,
        };
        let yes = Ok(Who::Tenant(own));
        match scope {
            Scope::Open | Scope::AnyCaller => yes,
            Scope::Probe => Err(ApiError::Forbidden(format!(
                "the token is tenant {own}'s: the full view needs an admin credential or \
                 METRICS_TOKEN; send none for the anonymous view"
            ))),
            Scope::Tenant(Some(id)) if id.parse::<TenantId>().is_ok_and(|id| id == own) => yes,
            Scope::Tenant(Some(_)) => Err(ApiError::Forbidden(format!(
                "the token is tenant {own}'s and reaches only that tenant"
            ))),
            Scope::Tenant(None) => Err(ApiError::Forbidden(format!(
                "the token is tenant {own}'s: ask for its own messages with ?tenant_id={own}"
            ))),
            Scope::Admin => Err(ApiError::Forbidden(format!(
                "this needs an admin credential; the token is tenant {own}'s"
            ))),
        }
    }

    fn is_metrics_token(&self, header: &str) -> bool {
        match (&self.metrics_token, bearer(header)) {
            (Some(expected), Some(token)) => {
                constant_time_eq(token.as_bytes(), expected.as_bytes())
            }
            _ => false,
        }
    }

    fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let invalid = |reason| ApiError::Unauthorized(Some(reason));
        let header = authorization.ok_or(ApiError::Unauthorized(None))?;
        let token = bearer(header).ok_or_else(|| invalid("not a bearer token"))?;
        if let Some(expected) = &self.api_token {
            if constant_time_eq(token.as_bytes(), expected.as_bytes()) {
                return Ok(Caller::Admin);
            }
        }
        if self.keys.is_empty() {
            return Err(invalid("wrong token"));
        }
        if token.split('.').count() != 3 {
            // Not a JWT: most often a mistyped API_TOKEN, which is what to say.
            return Err(invalid(match self.api_token {
                Some(_) => "wrong token: neither the API token nor a JWT",
                None => "not a JWT (header.payload.signature)",
            }));
        }
        // Each key verifies its own algorithm only; the token's header picks nothing.
        for key in &self.keys {
            match jsonwebtoken::decode::<Grant>(token, &key.key, &key.validation) {
                Ok(data) => return data.claims.caller().map_err(invalid),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidAlgorithm) => continue,
                Err(e) => return Err(invalid(refusal(&e))),
            }
        }
        Err(invalid(
            "the token is not signed with an accepted algorithm and key",
        ))
    }
}

/// The checks every JWT passes: `exp` required, `nbf` honoured, issuer and audience when set.
/// With no audience configured, a token naming one is refused (RFC 7519 4.1.3).
fn jwt_key(algorithm: Algorithm, key: DecodingKey, settings: &AuthSettings) -> JwtKey {
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    if let Some(audience) = &settings.audience {
        validation.set_audience(&[audience]);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    JwtKey { key, validation }
}

/// A PEM public key and the algorithm it verifies: RS256 for RSA, ES256 for P-256.
fn public_key(path: &Path) -> Result<(Algorithm, DecodingKey)> {
    let shown = path.display();
    let pem =
        std::fs::read(path).with_context(|| format!("reading JWT_PUBLIC_KEY_FILE {shown}"))?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("PRIVATE KEY-----") {
        bail!(
            "JWT_PUBLIC_KEY_FILE {shown} holds a private key; give its public key \
             (`openssl pkey -in key.pem -pubout`)"
        );
    }
    if !text.contains("-----BEGIN PUBLIC KEY-----") && !text.contains("-----BEGIN RSA PUBLIC KEY") {
        bail!("JWT_PUBLIC_KEY_FILE {shown} is not a PEM public key");
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        // Building an ES256 verifier fails for a point that is not on P-256.
        if jsonwebtoken::crypto::verify("AA", b"probe", &key, Algorithm::ES256).is_ok() {
            return Ok((Algorithm::ES256, key));
        }
        bail!("JWT_PUBLIC_KEY_FILE {shown} is an EC key but not on P-256 (ES256)");
    }
    bail!("JWT_PUBLIC_KEY_FILE {shown} is neither an RSA nor a P-256 EC public key")
}

/// What the server reads from a verified token (it checks `exp`, `nbf`, `iss` and `aud` itself).
#[derive(Deserialize)]
struct Grant {
    role: Option<String>,
    tenant_id: Option<String>,
}

impl Grant {
    fn caller(self) -> Result<Caller, &'static str> {
        match (self.role.as_deref(), self.tenant_id) {
            (Some("admin"), None) => Ok(Caller::Admin),
            (Some("admin"), Some(_)) => Err("an admin token carries no tenant_id"),
            (Some("tenant"), Some(id)) => id
                .parse()
                .map(Caller::Tenant)
                .map_err(|_| "the tenant_id claim is not a tenant id (a UUID)"),
            (Some("tenant"), None) => Err("a tenant token needs a tenant_id claim"),
            _ => Err("the role claim must be admin or tenant"),
        }
    }
}

/// Why a JWT was refused, in words safe to send back and to log (never the token's content).
fn refusal(e: &jsonwebtoken::errors::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidSignature => "the signature does not verify",
        ErrorKind::InvalidIssuer => "wrong issuer (iss)",
        ErrorKind::InvalidAudience => "wrong audience (aud)",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => "the token has no exp claim",
            "iss" => "the token has no iss claim",
            "aud" => "the token has no aud claim",
            _ => "the token lacks a required claim",
        },
        ErrorKind::InvalidClaimFormat(_) => "a claim of the token is malformed",
        _ => "malformed token",
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares a presented token with a secret in time that does not depend on where they
/// differ (only on their lengths, which are not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// The claims `tenantd token` signs.
#[derive(Serialize)]
struct Minted<'a> {
    role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_id: Option<String>,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// A token for `caller`, valid for `ttl` from now, signed with the HS256 secret and carrying
/// the configured issuer and audience: one this server accepts.
pub fn mint(settings: &AuthSettings, caller: Caller, ttl: Duration) -> Result<String> {
    let Some(secret) = &settings.hs256_secret else {
        bail!("minting a token needs JWT_HS256_SECRET (the server must be given it too)");
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let (role, tenant_id) = match caller {
        Caller::Admin => ("admin", None),
        Caller::Tenant(id) => ("tenant", Some(id.to_string())),
    };
    let claims = Minted {
        role,
        tenant_id,
        iat: now,
        exp: now + ttl.as_secs(),
        iss: settings.issuer.as_deref(),
        aud: settings.audience.as_deref(),
    };
    let key = EncodingKey::from_secret(secret.as_bytes()).context("JWT_HS256_SECRET")?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).context("signing a token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_whatever_the_scheme_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        for refused in ["", "Bearer", "Bearer ", "Basic abc", "abc", "Bearerabc"] {
            assert_eq!(bearer(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn a_tenant_route_admits_the_tenant_the_route_reads() {
        let id = "2a7a0324-8118-4e0a-9699-35c1ca694c2e";
        let tenant = |path: &str, query: &str| match scope(
            &Method::Get,
            Route::parse(path).as_ref(),
            path,
            query,
        ) {
            Scope::Tenant(named) => named,
            _ => panic!("{path}?{query} is not a tenant's"),
        };
        assert_eq!(tenant(&format!("/api/tenants/{id}/"), ""), Some(id.into()));
        let query = format!("tenant_id={id}&tenant_id=other");
        assert_eq!(tenant("/api/messages", &query), Some(id.into()));
        assert_eq!(tenant("/api/messages", "tenant%5Fid=x"), Some("x".into()));
        assert_eq!(tenant("/api/messages", "limit=5"), None);
        let unknown = scope(&Method::Get, None, "/api/nothing", "");
        assert!(matches!(unknown, Scope::Admin));
        let elsewhere = scope(&Method::Get, None, "/favicon.ico", "");
        assert!(matches!(elsewhere, Scope::Open));
    }
}
