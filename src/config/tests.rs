//! The settings as parsed and checked.

use super::*;

#[test]
fn every_setting_says_what_it_accepts_and_is_named_once() {
    for s in SETTINGS {
        assert!(!s.accepts.is_empty(), "{} has no bounds", s.name);
        assert!(!s.help.is_empty(), "{} has no help", s.name);
    }
    let names: std::collections::HashSet<_> = SETTINGS.iter().map(|s| s.name).collect();
    assert_eq!(names.len(), SETTINGS.len());
}

#[test]
fn origins_are_scheme_host_and_port_only() {
    let parsed = parse::origins(" https://Console.example.com, http://127.0.0.1:3000 ,").unwrap();
    assert_eq!(
        parsed,
        ["https://console.example.com", "http://127.0.0.1:3000"]
    );
    assert!(parse::origins("").unwrap().is_empty());
    for bad in [
        "console.example.com",
        "https://x.example/app",
        "ftp://x",
        "https://",
    ] {
        assert!(parse::origins(bad).is_err(), "{bad}");
    }
}

#[test]
fn each_bound_is_refused_naming_its_setting() {
    for (name, value) in [
        ("FAILOVER_TIMEOUT", "1"),
        ("DB_KEEPALIVE_MS", "1999"),
        ("HTTP_TIMEOUT_MS", "99"),
        ("CONNECT_TIMEOUT_MS", "0"),
        ("HTTP_MAX_CONNECTIONS", "0"),
        ("WORKER_POOL_SIZE", "0"),
        ("MAX_WORKERS", "0"),
        ("LOG_FORMAT", "yaml"),
        ("QUEUE_TYPE", "stream"),
    ] {
        let err = refused(&[(name, value)]);
        assert!(err.starts_with(name), "{name}={value}: {err}");
    }
}

#[test]
fn a_secret_too_short_is_refused_without_repeating_it() {
    let err = refused(&[("API_TOKEN", "short-secret-value")]);
    assert!(!err.contains("short-secret-value"), "{err}");
}

#[test]
fn a_prefetch_that_cannot_be_is_refused_naming_both_settings() {
    let lookup = |n: &str| (n == "BATCH_SIZE").then(|| "1024".to_string());
    let err = Config::from_lookup(lookup).unwrap_err().to_string();
    assert!(err.contains("MAX_WORKERS x BATCH_SIZE"), "{err}");
}

#[test]
fn defaults_parse() {
    let config = Config::from_lookup(|_| None).unwrap();
    assert_eq!(config.default_workers, 3);
    assert_eq!(config.batch_size, 100);
    assert_ne!(
        config.replica_id,
        Config::from_lookup(|_| None).unwrap().replica_id,
        "unique per process"
    );
    assert_eq!(config.http_addr, "127.0.0.1:8080");
    assert_eq!(config.jwt_leeway, Duration::from_secs(30));
}

#[test]
fn retry_delays_parse() {
    let config = Config::from_lookup(|n| (n == "RETRY_DELAYS_MS").then(|| "5, 10".into())).unwrap();
    assert_eq!(
        config.retry_delays,
        [Duration::from_millis(5), Duration::from_millis(10)]
    );
    let none = Config::from_lookup(|n| (n == "RETRY_DELAYS_MS").then(|| "none".into())).unwrap();
    assert!(none.retry_delays.is_empty());
    assert!(Config::from_lookup(|n| (n == "RETRY_DELAYS_MS").then(|| "1,x".into())).is_err());
}

#[test]
fn bad_numbers_name_the_variable() {
    let err = Config::from_lookup(|n| (n == "DEFAULT_WORKERS").then(|| "x".into())).unwrap_err();
    assert!(err.to_string().contains("DEFAULT_WORKERS"), "{err}");
}

/// The error of a start with these settings (and the defaults for the rest).
fn refused(settings: &[(&str, &str)]) -> String {
    let lookup = |n: &str| {
        settings
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_string())
    };
    Config::from_lookup(lookup).unwrap_err().to_string()
}

#[test]
fn an_open_api_beyond_loopback_is_refused_unless_opted_into() {
    let err = refused(&[("HTTP_ADDR", "0.0.0.0:8080")]);
    for named in [
        "API_TOKEN",
        "JWT_HS256_SECRET",
        "ALLOW_INSECURE_OPEN_API=1",
        "127.0.0.1",
    ] {
        assert!(err.contains(named), "{named} missing: {err}");
    }
    let token = "t".repeat(32);
    let ok = |settings: &[(&str, &str)]| {
        let lookup = |n: &str| {
            settings
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        };
        Config::from_lookup(lookup).is_ok()
    };
    assert!(ok(&[("HTTP_ADDR", "0.0.0.0:8080"), ("API_TOKEN", &token)]));
    assert!(ok(&[
        ("HTTP_ADDR", "0.0.0.0:8080"),
        ("ALLOW_INSECURE_OPEN_API", "1")
    ]));
    assert!(ok(&[("HTTP_ADDR", "127.0.0.2:8080")]));
    assert!(ok(&[("HTTP_ADDR", "[::1]:8080")]));
    assert!(refused(&[("ALLOW_INSECURE_OPEN_API", "yes")]).contains("neither 0 nor 1"));
}

#[test]
fn tokens_leeway_rates_origins_and_message_sizes_have_bounds() {
    let short = "t".repeat(31);
    for name in ["API_TOKEN", "METRICS_TOKEN", "JWT_HS256_SECRET"] {
        let err = refused(&[(name, &short)]);
        assert!(
            err.contains(&format!("{name} must be at least 32 bytes")),
            "{err}"
        );
    }
    assert!(refused(&[("JWT_LEEWAY_SECS", "301")]).contains("at most 300"));
    assert!(refused(&[("RATE_LIMIT_BURST", "0")]).contains("RATE_LIMIT_BURST"));
    assert!(refused(&[("RATE_LIMIT_PER_SEC", "1000001")]).contains("RATE_LIMIT_PER_SEC"));
    assert!(refused(&[("HTTP_ALLOWED_ORIGINS", "evil.example")]).contains("not an origin"));
    let err = refused(&[("MAX_MESSAGE_BYTES", "536870913")]);
    assert!(err.contains("max_message_size"), "{err}");
    let config = Config::from_lookup(|n| {
        (n == "HTTP_ALLOWED_ORIGINS").then(|| "https://a.example, http://localhost:3000".into())
    })
    .unwrap();
    assert_eq!(
        config.http_allowed_origins,
        ["https://a.example", "http://localhost:3000"]
    );
    assert_eq!(
        (config.rate_limit_per_sec, config.rate_limit_burst),
        (100, 200)
    );
}
