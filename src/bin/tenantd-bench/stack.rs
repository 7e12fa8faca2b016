//! The system under test: a fresh database and the real tenantd binary as a child process.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::{json, Value};

#[allow(dead_code)] // the tests use all of it, the bench a part
#[path = "../../../tests/it/support/http.rs"]
pub mod http;

pub struct Stack {
    pub pg_server: String,
    pub db_name: String,
    pub amqp_url: String,
    child: Option<Child>,
    pub base: String,
}

impl Stack {
    pub fn new(pg_server: &str, amqp_url: &str) -> Stack {
        let db_name = "tenantd_bench".to_string();
        let mut admin = Client::connect(&format!("{pg_server}/postgres"), NoTls)
            .unwrap_or_else(|e| panic!("PostgreSQL unreachable at {pg_server}: {e}"));
        for sql in [
            format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"),
            format!("CREATE DATABASE {db_name}"),
        ] {
            admin
                .batch_execute(&sql)
                .expect("creating the bench database");
        }
        Stack {
            pg_server: pg_server.into(),
            db_name,
            amqp_url: amqp_url.into(),
            child: None,
            base: String::new(),
        }
    }

    pub fn pg(&self) -> Client {
        Client::connect(&format!("{}/{}", self.pg_server, self.db_name), NoTls).unwrap()
    }

    /// Starts tenantd with these extra settings and waits until it answers /healthz.
    pub fn start(&mut self, env: &[(&str, &str)]) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let exe = std::env::current_exe().unwrap().with_file_name("tenantd");
        let mut cmd = Command::new("sh");
        // ~4 file descriptors per tenant: raise the file limit as scripts/run.sh does.
        let raise = r#"ulimit -n 1048576 2>/dev/null || ulimit -S -n "$(ulimit -H -n)"; exec "$0""#;
        cmd.args(["-c", raise])
            .arg(&exe)
            .env(
                "DATABASE_URL",
                format!("{}/{}", self.pg_server, self.db_name),
            )
            .env("RABBITMQ_URL", &self.amqp_url)
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.spawn()
                .expect("starting tenantd (build it with --release)"),
        );
        self.base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tenantd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait: the same clean shutdown an operator gets.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> http::Reply {
        let body = body.map(|b| b.to_string());
        http::request(&self.base, method, path, body.as_deref().map(str::as_bytes))
    }

    pub fn create_tenant(&self, name: &str, status: &str) -> String {
        let reply = self.request(
            "POST",
            "/api/tenants",
            Some(json!({"name": name, "status": status})),
        );
        assert_eq!(reply.status, 201, "{}", reply.text());
        reply.json()["id"].as_str().unwrap().to_string()
    }

    pub fn set_status(&self, tenant: &str, status: &str) {
        let reply = self.request(
            "PATCH",
            &format!("/api/tenants/{tenant}"),
            Some(json!({"status": status})),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
    }

    pub fn rows(&self, pg: &mut Client) -> i64 {
        pg.query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get(0)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}
