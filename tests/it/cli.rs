//! The binary as an operator runs it: help, clear start-up errors, clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{rabbitmq_url, TestDb};

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
    }
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

#[test]
fn sigterm_stops_tenantd_cleanly_with_exit_status_0() {
    let db = TestDb::create();
    let mut child = tenantd()
        .env("DATABASE_URL", db.url())
        .env("RABBITMQ_URL", rabbitmq_url())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("listening on"));
    assert!(listening.is_some(), "tenantd never said it was listening");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status, Some(0), "log: {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("received SIGTERM")),
        "{rest:?}"
    );
    assert!(
        rest.iter().any(|l| l.contains("shutdown complete")),
        "{rest:?}"
    );
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
