//! The binary as an operator runs it: help, clear start-up errors, clean exit on SIGTERM.

use std::process::Command;

use crate::support::child::Tenantd;
use crate::support::{rabbitmq_url, Amqp, TestDb};

fn tenantd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantd"));
    cmd.env_clear().env("HTTP_ADDR", "127.0.0.1:0");
    cmd
}

#[test]
fn help_lists_every_setting_with_its_default() {
    let out = tenantd().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for s in tenantd::config::SETTINGS {
        assert!(text.contains(s.name), "{} missing from --help", s.name);
        assert!(text.contains(s.default), "default of {} missing", s.name);
        let accepts = s.accepts;
        assert!(text.contains(accepts), "what {} accepts is missing", s.name);
    }
}

#[test]
fn help_states_the_worst_case_memory() {
    let out = tenantd().arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let memory = text
        .split("Memory at worst")
        .nth(1)
        .expect("a memory paragraph");
    for said in [
        "workers x BATCH_SIZE",
        "max_message_size",
        "300 MiB a tenant",
        "HTTP guard: 288 MiB at most",
        "4 MiB of payloads",
    ] {
        assert!(memory.contains(said), "{said} missing: {memory}");
    }
}

#[test]
fn an_open_api_beyond_loopback_is_refused_before_anything_is_connected_to() {
    use std::net::TcpListener;
    // Where tenantd would connect first: listeners that count who comes.
    let (pg, amqp) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let database = format!(
        "postgres://postgres:postgres@{}/sample_db",
        pg.local_addr().unwrap()
    );
    let broker = format!("amqp://guest:guest@{}/%2f", amqp.local_addr().unwrap());
    let metrics_token = "m".repeat(32); // not a credential of the API
    let refused = [
        vec![("HTTP_ADDR", "0.0.0.0:0")],
        vec![("HTTP_ADDR", "[::]:0")],
        vec![
            ("HTTP_ADDR", "0.0.0.0:0"),
            ("METRICS_TOKEN", &metrics_token),
        ],
        vec![("HTTP_ADDR", "0.0.0.0:0"), ("API_TOKEN", "too-short")],
        vec![("HTTP_ADDR", "localhost"), ("API_TOKEN", &metrics_token)],
    ];
    for settings in refused {
        let out = tenantd()
            .env("DATABASE_URL", &database)
            .env("RABBITMQ_URL", &broker)
            .env("CONNECT_TIMEOUT_MS", "1000")
            .envs(settings.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{settings:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let named = ["ALLOW_INSECURE_OPEN_API=1", "API_TOKEN"];
        let short = "API_TOKEN must be at least 32 bytes";
        let unlistenable = "HTTP_ADDR=\"localhost\" is not an address to listen on";
        assert!(
            named.iter().all(|n| err.contains(n))
                || err.contains(short)
                || err.contains(unlistenable),
            "{settings:?}: {err}"
        );
    }
    for listener in [pg, amqp] {
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.accept().is_err(),
            "tenantd connected before refusing its settings"
        );
    }
}

#[test]
fn a_replica_id_in_use_is_refused_in_one_line_that_reads_as_no_shutdown() {
    let db = TestDb::create();
    let env = [
        ("DATABASE_URL", db.url()),
        ("RABBITMQ_URL", rabbitmq_url()),
        ("REPLICA_ID", "twin".to_string()),
    ];
    let running = Tenantd::start(&env);
    let out = tenantd().envs(env.iter().cloned()).output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("REPLICA_ID=\"twin\" is in use"), "{err}");
    assert!(!err.contains("shutdown"), "{err}");
    assert_eq!(running.request("GET", "/healthz", None).status, 200);
}

#[test]
fn a_missing_database_is_a_one_line_error_and_a_failure_exit() {
    let out = tenantd()
        .env(
            "DATABASE_URL",
            "postgres://postgres:postgres@127.0.0.1:1/sample_db",
        )
        .env("CONNECT_TIMEOUT_MS", "2000")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot connect to PostgreSQL at 127.0.0.1:1/sample_db"),
        "{err}"
    );
}

#[test]
fn a_missing_broker_is_a_one_line_error_and_a_failure_exit() {
    let db = TestDb::create();
    let out = tenantd()
        .env("DATABASE_URL", db.url())
        .env("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("cannot connect to RabbitMQ at 127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn stops_cleanly_on(signal: &str, name: &str) {
    let db = TestDb::create();
    let env = [("DATABASE_URL", db.url()), ("RABBITMQ_URL", rabbitmq_url())];
    let log = Tenantd::start(&env).stop_cleanly(signal);
    assert!(log.contains(&format!("received {name}")), "{log}");
    assert!(log.contains("shutdown complete"), "{log}");
}

#[test]
fn sigterm_stops_tenantd_cleanly_with_exit_status_0() {
    stops_cleanly_on("-TERM", "SIGTERM");
}

#[test]
fn sigint_stops_tenantd_cleanly_with_exit_status_0() {
    stops_cleanly_on("-INT", "SIGINT");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let db = TestDb::create();
    let env = [
        ("DATABASE_URL", db.url()),
        ("RABBITMQ_URL", rabbitmq_url()),
        ("LOG_FORMAT", "json".to_string()),
    ];
    let mut child = Tenantd::start(&env);
    let reply = child.request("POST", "/api/tenants", Some(r#"{"name": "logged"}"#));
    let tenant = reply.json()["id"].as_str().unwrap().to_string();
    let log = child.stop_cleanly("-TERM");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let created = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("tenant created"))
        })
        .expect("a tenant created line");
    assert_eq!(created["tenant_id"], tenant.as_str());
    assert_eq!(created["level"], "INFO");
    assert!(created["request_id"].is_string() && created["time"].is_string());
    Amqp::connect().delete_tenant_queues(&tenant);
}

#[test]
fn a_shutdown_past_its_timeout_exits_1_instead_of_hanging() {
    let db = TestDb::create();
    let env = [
        ("DATABASE_URL", db.url()),
        ("RABBITMQ_URL", rabbitmq_url()),
        ("SHUTDOWN_TIMEOUT", "1".to_string()),
        ("STATEMENT_TIMEOUT_MS", "0".to_string()),
    ];
    let mut child = Tenantd::start(&env);
    let reply = child.request("POST", "/api/tenants", Some(r#"{"name": "stuck"}"#));
    let tenant = reply.json()["id"].as_str().unwrap().to_string();
    let mut pg = db.client();
    let lock = crate::support::lock_partition(&mut pg, &tenant);
    let mut amqp = Amqp::connect();
    amqp.publish(&crate::support::queue_name(&tenant), b"{}", None);
    amqp.wait_confirms();
    crate::support::wait_until(
        std::time::Duration::from_secs(10),
        "the batch in flight",
        || {
            child
                .request("GET", &format!("/api/tenants/{tenant}"), None)
                .json()["counts"]["consumed"]
                == 1
        },
    );
    child.signal("-TERM");
    let status = child.wait(std::time::Duration::from_secs(10));
    assert_eq!(status, Some(1), "{:?}", child.lines());
    assert!(
        child
            .lines()
            .iter()
            .any(|l| l.contains("longer than SHUTDOWN_TIMEOUT")),
        "{:?}",
        child.lines()
    );
    lock.rollback().unwrap();
    amqp.delete_tenant_queues(&tenant);
}

#[test]
fn the_readme_tells_every_setting_its_default_and_what_it_accepts() {
    let readme = include_str!("../../README.md");
    let table: Vec<&str> = readme
        .split("## Configuration")
        .nth(1)
        .expect("a Configuration section")
        .lines()
        .filter(|l| l.starts_with("| `"))
        .collect();
    assert_eq!(
        table.len(),
        tenantd::config::SETTINGS.len(),
        "one row per setting"
    );
    for s in tenantd::config::SETTINGS {
        let row = table
            .iter()
            .find(|l| l.starts_with(&format!("| `{}` |", s.name)))
            .unwrap_or_else(|| panic!("{} is missing from the README", s.name));
        let default = match s.default {
            "" => "(unset)".to_string(),
            d => format!("`{d}`"),
        };
        assert!(
            row.contains(&format!("| {default} |")),
            "{}: default {default}: {row}",
            s.name
        );
        let accepts = s.accepts;
        assert!(
            row.ends_with(&format!("| {accepts} |")),
            "{}: accepts {accepts}: {row}",
            s.name
        );
    }
}

#[test]
fn the_readmes_curl_examples_send_their_bodies_as_json() {
    let readme = include_str!("../../README.md");
    // Each command whole: its continuation lines joined.
    let commands = readme.replace("\\\n", " ");
    let with_bodies: Vec<&str> = commands
        .lines()
        .filter(|l| l.contains("curl ") && l.contains(" -d "))
        .collect();
    assert!(with_bodies.len() >= 10, "{with_bodies:?}");
    for command in with_bodies {
        assert!(
            command.contains(r#"-H "$J""#) || command.contains("Content-Type: application/json"),
            "a body without its JSON Content-Type (415): {command}"
        );
    }
    assert!(readme.contains("J='Content-Type: application/json'"));
}
