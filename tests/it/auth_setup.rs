//! What an operator sets up for tenant-scoped access: `tenantd token` mints what the server
//! accepts, keys that cannot verify stop the start, an open API on a public address warns, and
//! a tenant's broker user (as docs/access.md makes one) publishes to its own queue alone.

use amiquip::{ExchangeDeclareOptions, ExchangeType, FieldTable, Publish};
use serde_json::Value;
use tenantd::Config;

use crate::auth::{create_tenant, API_TOKEN};
use crate::support::child::Tenantd;
use crate::support::logs::lines_with;
use crate::support::tokens::{call, KeyPair, SECRET};
use crate::support::vhost::Vhost;
use crate::support::{queue_name, rabbitmq_url, TestApp, TestDb};

#[test]
fn tenantd_token_mints_tokens_the_server_accepts() {
    let settings = |c: &mut Config| {
        c.jwt_hs256_secret = Some(SECRET.into());
        c.jwt_issuer = Some("tenantd-ops".into());
        c.jwt_audience = Some("tenantd".into());
    };
    let app = TestApp::spawn_with(settings);
    let mint = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tenantd"))
            .env_clear()
            .env("JWT_HS256_SECRET", SECRET)
            .env("JWT_ISSUER", "tenantd-ops")
            .env("JWT_AUDIENCE", "tenantd")
            .arg("token")
            .args(args)
            .output()
            .unwrap()
    };
    let admin = mint(&["--admin"]);
    assert!(
        admin.status.success(),
        "{}",
        String::from_utf8_lossy(&admin.stderr)
    );
    let admin = String::from_utf8(admin.stdout).unwrap().trim().to_string();
    let base = app.base();
    let tenant = create_tenant(&base, &admin, "minted");
    let out = mint(&["--tenant", &tenant, "--ttl", "2h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let get = |path: &str| call(&base, Some(&token), "GET", path, None);
    assert_eq!(get(&format!("/api/tenants/{tenant}")).status, 200);
    get("/api/tenants").assert_forbidden();
    let claims = jsonwebtoken::dangerous::insecure_decode_claims::<Value>(&token).unwrap();
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 7200, "{claims}");
    // A token names one caller: both flags are refused, not settled by the last one.
    let both = mint(&["--admin", "--tenant", &tenant]);
    assert_eq!(both.status.code(), Some(1));
    assert!(both.stdout.is_empty(), "no token printed");
    let err = String::from_utf8(both.stderr).unwrap();
    assert!(err.contains("name one caller"), "{err}");
    // Without a secret there is nothing to sign with: one line saying which setting is missing.
    let unsigned = std::process::Command::new(env!("CARGO_BIN_EXE_tenantd"))
        .env_clear()
        .args(["token", "--admin"])
        .output()
        .unwrap();
    assert_eq!(unsigned.status.code(), Some(1));
    let err = String::from_utf8(unsigned.stderr).unwrap();
    assert!(
        err.contains("JWT_HS256_SECRET") && err.trim().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn keys_that_cannot_verify_stop_the_start_with_a_clear_error() {
    let db = TestDb::create();
    let start_with = |adjust: &dyn Fn(&mut Config)| {
        let mut config = crate::support::test_config(&db);
        adjust(&mut config);
        match tenantd::start(config) {
            Ok(app) => {
                app.shutdown().unwrap();
                panic!("tenantd started");
            }
            Err(e) => format!("{e:#}"),
        }
    };
    let rsa = KeyPair::rsa();
    let private = rsa.private_file();
    let err = start_with(&|c| c.jwt_public_key_file = Some(private.clone()));
    assert!(err.contains("holds a private key"), "{err}");
    let p384 = KeyPair::p384();
    let err = start_with(&|c| c.jwt_public_key_file = Some(p384.public_file()));
    assert!(err.contains("not on P-256"), "{err}");
    let missing = std::path::PathBuf::from("/nonexistent/key.pem");
    let err = start_with(&|c| c.jwt_public_key_file = Some(missing.clone()));
    assert!(err.contains("/nonexistent/key.pem"), "{err}");
    let short = Config::from_lookup(|n| (n == "JWT_HS256_SECRET").then(|| "short".into()));
    assert!(short.unwrap_err().to_string().contains("at least 32 bytes"));
}

#[test]
fn an_open_api_on_a_public_address_opted_into_warns_at_start_and_a_credential_quiets_it() {
    let db = TestDb::create();
    let env = |extra: &[(&'static str, &str)]| {
        let mut env = vec![("DATABASE_URL", db.url()), ("RABBITMQ_URL", rabbitmq_url())];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        env
    };
    let warning = "open to anyone who can reach 0.0.0.0:";
    let opted_in = [("HTTP_ADDR", "0.0.0.0:0"), ("ALLOW_INSECURE_OPEN_API", "1")];
    let mut open = Tenantd::start(&env(&opted_in));
    let log = open.stop_cleanly("-TERM");
    let line = log
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("WARN"), "{line}");
    for remedy in [
        "API_TOKEN",
        "JWT_HS256_SECRET",
        "JWT_PUBLIC_KEY_FILE",
        "127.0.0.1",
    ] {
        assert!(line.contains(remedy), "{remedy} missing from {line}");
    }
    let guarded = [("HTTP_ADDR", "0.0.0.0:0"), ("API_TOKEN", API_TOKEN)];
    let log = Tenantd::start(&env(&guarded)).stop_cleanly("-TERM");
    assert!(!log.contains("open to anyone"), "{log}");
    assert!(log.contains("API access: API_TOKEN (admin)"), "{log}");
    // On loopback (the default address) an open API is said once, quietly.
    let app = TestApp::spawn();
    let addr = app.base().trim_start_matches("http://").to_string();
    let said = lines_with(&["API access: open", &addr]);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("INFO"), "{said:?}");
}

#[test]
fn a_tenants_broker_user_publishes_to_its_own_queue_and_nowhere_else() {
    let vhost = Vhost::create();
    let app = TestApp::spawn_with(|c| c.rabbitmq_url = vhost.url());
    let (a, b) = (app.create_tenant("a"), app.create_tenant("b"));
    // The README's recipe: the user may declare and write to its own exchange, bind its own
    // queue to it, and nothing more.
    let exchange = format!("tenant_{a}_in");
    let user = vhost.add_user(
        &format!("tenantd_it_{}", uuid::Uuid::new_v4().simple()),
        "publisher-password",
        [
            &format!("^tenant_{a}_in$"),
            &format!("^tenant_{a}_(in|queue)$"),
            &format!("^tenant_{a}_in$"),
        ],
    );
    let addr = tenantd::BrokerAddr::parse(&user.url).unwrap();
    let mut connection =
        tenantd::connect_broker(&addr, std::time::Duration::from_secs(5), "publisher").unwrap();
    let channel = connection.open_channel(None).unwrap();
    let options = ExchangeDeclareOptions {
        durable: true,
        auto_delete: true,
        ..Default::default()
    };
    channel
        .exchange_declare(ExchangeType::Fanout, exchange.as_str(), options)
        .unwrap();
    channel
        .queue_bind(queue_name(&a), exchange.as_str(), "", FieldTable::default())
        .unwrap();
    let mut publish = Publish::new(br#"{"via": "own exchange"}"#, "");
    publish.mandatory = true;
    channel.basic_publish(exchange.as_str(), publish).unwrap();
    app.wait_rows(&a, 1);
    // Everything else closes the channel with ACCESS_REFUSED (403).
    type Attempt<'a> = Box<dyn Fn(&amiquip::Channel) -> amiquip::Result<()> + 'a>;
    let attempts: Vec<(&str, Attempt)> = vec![
        (
            "publish to B's queue through the default exchange",
            Box::new(|ch| {
                ch.basic_publish("", Publish::new(b"{}", queue_name(&b)))?;
                ch.exchange_declare_passive(exchange.as_str()).map(drop)
            }),
        ),
        (
            "publish to its own queue through the default exchange",
            Box::new(|ch| {
                ch.basic_publish("", Publish::new(b"{}", queue_name(&a)))?;
                ch.exchange_declare_passive(exchange.as_str()).map(drop)
            }),
        ),
        (
            "bind B's queue to its exchange",
            Box::new(|ch| {
                ch.queue_bind(queue_name(&b), exchange.as_str(), "", FieldTable::default())
            }),
        ),
        (
            "declare an exchange of B's",
            Box::new(|ch| {
                let name = format!("tenant_{b}_in");
                ch.exchange_declare(ExchangeType::Fanout, name, Default::default())
                    .map(drop)
            }),
        ),
        (
            "read its own queue",
            Box::new(|ch| ch.basic_get(queue_name(&a), false).map(drop)),
        ),
        (
            "delete its own queue",
            Box::new(|ch| {
                ch.queue_delete(queue_name(&a), Default::default())
                    .map(drop)
            }),
        ),
    ];
    for (what, attempt) in attempts {
        let channel = connection.open_channel(None).unwrap();
        match attempt(&channel) {
            Err(amiquip::Error::ServerClosedChannel { code: 403, .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    let _ = connection.close();
    assert_eq!(app.partition_rows(&a), 1);
    assert_eq!(app.partition_rows(&b), 0);
    let tenant = app.get(&format!("/api/tenants/{a}")).json();
    assert_eq!(tenant["queue"]["consumers"], 1, "{tenant}");
}
