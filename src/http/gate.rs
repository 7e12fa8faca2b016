//! What stands between a request and the routes: where it comes from (`access`: Origin, and
//! Host when open), who calls (`auth`), and how often (`rate`).

use tiny_http::{Method, Request};

use super::access::Browsers;
use super::auth::{Auth, Who};
use super::error::ApiError;
use super::guard::{self, ClientKey};
use super::rate::{Bucket, RateLimiter};
use super::{header_value, routes, HttpSettings};

pub struct Gate {
    browsers: Browsers,
    auth: Auth,
    rates: RateLimiter,
}

impl Gate {
    pub fn new(settings: &HttpSettings, auth: Auth) -> Gate {
        Gate {
            browsers: Browsers::new(settings.allowed_origins.clone(), auth.is_open()),
            rates: RateLimiter::new(settings.rate_per_sec, settings.rate_burst),
            auth,
        }
    }

    /// A web page's origin allowed (`Some`: answer it with CORS), none, or a refusal.
    pub fn check_origin<'a>(
        &self,
        origin: Option<&'a str>,
        host: Option<&str>,
    ) -> Result<Option<&'a str>, ApiError> {
        self.browsers.check(origin, host)
    }

    /// Who calls, if they may, and within their rate: a caller with a credential draws on its
    /// own bucket, anyone else (and everyone on an open API) on their address's.
    pub fn admit(
        &self,
        request: &Request,
        method: &Method,
        route: Option<&routes::Route>,
        path: &str,
        query: &str,
    ) -> Result<Who, ApiError> {
        let authorization = header_value(request, "Authorization");
        let who = self
            .auth
            .authorize(method, route, path, query, authorization.as_deref());
        let address = Bucket::Address(client_of(request));
        let bucket = match who {
            Ok(Who::Admin) => Bucket::Admin,
            Ok(Who::Tenant(id)) => Bucket::Tenant(id),
            Ok(Who::Monitor) => Bucket::Metrics,
            Ok(Who::Anyone | Who::Anonymous) | Err(_) => address,
        };
        // Liveness costs nothing and must answer whatever a client does.
        if !matches!(route, Some(routes::Route::Health)) {
            if let Err(wait) = self.rates.take(bucket) {
                return Err(ApiError::TooManyRequests(bucket.to_string(), wait));
            }
        }
        who
    }
}

/// The client's address, as the guard tells it.
fn client_of(request: &Request) -> ClientKey {
    let ip = header_value(request, guard::CLIENT_HEADER)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    ClientKey::of(ip)
}
