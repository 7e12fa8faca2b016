//! Who can reach the API before any credential is looked at: the start is refused when the API
//! would be open beyond this host; a web page may call it only from an allowed origin; and an
//! open API answers only to names a DNS rebinding cannot take (IP addresses, `localhost`).

use std::net::{IpAddr, ToSocketAddrs};

use anyhow::{bail, Context, Result};

use super::error::ApiError;
use super::routes::Route;
use super::{ApiResponse, Body};

/// What the start checks of the settings that say who can reach the API.
pub struct Exposure<'a> {
    pub http_addr: &'a str,
    /// `API_TOKEN`, `JWT_HS256_SECRET` or `JWT_PUBLIC_KEY_FILE` is set.
    pub credential: bool,
    pub allow_insecure_open_api: bool,
}

/// Refuses an API open to other hosts, run with every other check before anything connects.
pub fn check_exposure(exposure: &Exposure) -> Result<()> {
    let addr = exposure.http_addr;
    if !exposure.credential && !exposure.allow_insecure_open_api && !is_loopback_only(addr)? {
        bail!(
            "HTTP_ADDR={addr} is reachable from other hosts and no credential is set: anyone \
             reaching it could read, publish and delete every tenant's messages. Set API_TOKEN \
             (`openssl rand -hex 32`), JWT_HS256_SECRET or JWT_PUBLIC_KEY_FILE; or listen on \
             127.0.0.1; or, to serve it open all the same, ALLOW_INSECURE_OPEN_API=1"
        );
    }
    Ok(())
}

/// Whether every address `addr` (host:port) names is a loopback one: 127.0.0.0/8 or ::1
/// (IPv4-mapped too). `0.0.0.0` and `::` are every interface, not loopback.
pub fn is_loopback_only(addr: &str) -> Result<bool> {
    let mut resolved = addr
        .to_socket_addrs()
        .with_context(|| format!("HTTP_ADDR={addr:?} is not an address"))?
        .peekable();
    if resolved.peek().is_none() {
        bail!("HTTP_ADDR={addr:?} resolves to nothing");
    }
    Ok(resolved.all(|a| a.ip().to_canonical().is_loopback()))
}

/// The checks on where a request comes from: its `Origin` (a web page) and, when the API is
/// open, its `Host`.
pub struct Browsers {
    origins: Vec<String>,
    open: bool,
}

/// What a page of an allowed origin may send, and read of the answer.
const ALLOWED_HEADERS: &str = "Authorization, Content-Type, X-Request-Id";
const EXPOSED_HEADERS: &str = "X-Request-Id, Retry-After, WWW-Authenticate";

/// The answer to a preflight (`OPTIONS` from an allowed origin): the route exists; what it
/// allows is in `cors_headers`.
pub fn preflight(route: Option<&Route>) -> Result<ApiResponse, ApiError> {
    match route {
        Some(_) => Ok(ApiResponse {
            status: 204,
            body: Body::Empty,
        }),
        None => Err(ApiError::NotFound("no such path".into())),
    }
}

/// The CORS headers of an answer to a page of the allowed `origin` (a preflight's too).
pub fn cors_headers(
    origin: &str,
    method: &tiny_http::Method,
    route: Option<&Route>,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("Access-Control-Allow-Origin", origin.to_string()),
        ("Vary", "Origin".to_string()),
        ("Access-Control-Expose-Headers", EXPOSED_HEADERS.to_string()),
    ];
    if let (tiny_http::Method::Options, Some(route)) = (method, route) {
        headers.extend([
            ("Access-Control-Allow-Methods", route.allowed().join(", ")),
            ("Access-Control-Allow-Headers", ALLOWED_HEADERS.to_string()),
            ("Access-Control-Max-Age", "600".to_string()),
        ]);
    }
    headers
}

impl Browsers {
    pub fn new(origins: Vec<String>, open: bool) -> Browsers {
        Browsers { origins, open }
    }

    /// Admits the request or refuses it with 403. `Ok(Some(origin))`: an allowed web page
    /// calls, and the answer says so (CORS).
    pub fn check<'a>(
        &self,
        origin: Option<&'a str>,
        host: Option<&str>,
    ) -> Result<Option<&'a str>, ApiError> {
        if self.open {
            if let Some(host) = host.filter(|h| !is_rebinding_proof(h)) {
                return Err(ApiError::ForeignCaller(format!(
                    "the API is open (no credential), so it answers only to an IP address or \
                     localhost, not to Host {host:?}; call it by address, or configure a \
                     credential"
                )));
            }
        }
        let Some(origin) = origin else {
            return Ok(None);
        };
        if self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
            return Ok(Some(origin));
        }
        Err(ApiError::ForeignCaller(format!(
            "requests from web pages of {origin:?} are not allowed (HTTP_ALLOWED_ORIGINS)"
        )))
    }
}

/// A `Host` that names this host without DNS: an IP address or `localhost`, with any port. A
/// page that rebinds its own name to 127.0.0.1 still sends its name.
fn is_rebinding_proof(host: &str) -> bool {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6.split_once(']').is_some_and(|(address, port)| {
                address.parse::<std::net::Ipv6Addr>().is_ok()
                    && (port.is_empty() || port.starts_with(':'))
            })
        }
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_127_slash_8_and_the_ipv6_one() {
        for addr in [
            "127.0.0.1:8080",
            "127.0.0.2:80",
            "127.255.0.9:1",
            "[::1]:8080",
        ] {
            assert!(is_loopback_only(addr).unwrap(), "{addr}");
        }
        for addr in [
            "0.0.0.0:8080",
            "[::]:8080",
            "10.0.0.1:80",
            "[::ffff:10.0.0.1]:80",
        ] {
            assert!(!is_loopback_only(addr).unwrap(), "{addr}");
        }
        assert!(is_loopback_only("[::ffff:127.0.0.1]:80").unwrap());
        assert!(is_loopback_only("nonsense").is_err());
    }

    #[test]
    fn an_open_api_answers_only_to_addresses_and_localhost() {
        let open = Browsers::new(Vec::new(), true);
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:80",
            "10.1.2.3",
        ] {
            assert!(open.check(None, Some(host)).is_ok(), "{host}");
        }
        for host in [
            "evil.example:8080",
            "localhost.evil.example",
            "[::1",
            "127.0.0.1.nip.io",
        ] {
            assert!(open.check(None, Some(host)).is_err(), "{host}");
        }
        let guarded = Browsers::new(Vec::new(), false);
        assert!(guarded.check(None, Some("tenantd.internal:8080")).is_ok());
    }

    #[test]
    fn only_listed_origins_pass_and_are_told_so() {
        let browsers = Browsers::new(vec!["https://console.example.com".into()], false);
        assert_eq!(
            browsers
                .check(Some("https://console.example.com"), None)
                .unwrap(),
            Some("https://console.example.com")
        );
        assert!(browsers.check(Some("https://evil.example"), None).is_err());
        assert!(browsers.check(Some("null"), None).is_err());
        assert_eq!(browsers.check(None, None).unwrap(), None);
    }
}
