//! The system under test: a fresh database and the real tenantd binary as child processes (one
//! or several replicas). Everything the run creates in the broker is deleted when the stack is
//! dropped, on every path, a panic included.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::{json, Value};

#[allow(dead_code)] // the tests use all of it, the bench a part
#[path = "../../../tests/it/support/http.rs"]
pub mod http;

pub struct Replica {
    child: Child,
    pub base: String,
}

impl Replica {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

pub struct Stack {
    pub pg_server: String,
    pub db_name: String,
    pub amqp_url: String,
    /// Running replicas by name; "main" when there is one.
    replicas: BTreeMap<String, Replica>,
    /// Tenants created by the run, whose queues go at the end.
    created: Vec<String>,
    /// Where each replica's log goes (`<name>.log`, appended); the bench's stderr when unset.
    pub replica_logs: Option<std::path::PathBuf>,
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
            replicas: BTreeMap::new(),
            created: Vec::new(),
            replica_logs: None,
        }
    }

    pub fn pg(&self) -> Client {
        Client::connect(&format!("{}/{}", self.pg_server, self.db_name), NoTls).unwrap()
    }

    /// Starts the one replica with these extra settings.
    pub fn start(&mut self, env: &[(&str, &str)]) {
        self.start_replica("main", env);
    }

    /// Starts a replica named `name` and waits until it answers.
    pub fn start_replica(&mut self, name: &str, env: &[(&str, &str)]) {
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
            .env("REPLICA_ID", name)
            .env(
                "LOG_LEVEL",
                std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.replica_logs {
            let path = dir.join(format!("{name}.log"));
            let log = std::fs::File::options()
                .create(true)
                .append(true)
                .open(&path);
            cmd.stderr(log.unwrap_or_else(|e| panic!("{}: {e}", path.display())));
        }
        let child = cmd
            .spawn()
            .expect("starting tenantd (build it with --release)");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tenantd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.replicas.insert(name.into(), Replica { child, base });
    }

    pub fn replica(&self, name: &str) -> &Replica {
        &self.replicas[name]
    }

    /// The one replica (or the first).
    pub fn main(&self) -> &Replica {
        self.replicas.values().next().expect("a running replica")
    }

    pub fn pid(&self) -> u32 {
        self.main().pid()
    }

    /// SIGTERM and wait: the same clean shutdown an operator gets.
    pub fn stop(&mut self) {
        let names: Vec<String> = self.replicas.keys().cloned().collect();
        for name in names {
            self.signal(&name, "-TERM");
        }
    }

    /// Sends `signal` to a replica and waits for it to exit.
    pub fn signal(&mut self, name: &str, signal: &str) {
        if let Some(mut replica) = self.replicas.remove(name) {
            let _ = Command::new("kill")
                .args([signal, &replica.child.id().to_string()])
                .status();
            let _ = replica.child.wait();
        }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> http::Reply {
        let body = body.map(|b| b.to_string());
        let base = &self.main().base;
        http::request(base, method, path, body.as_deref().map(str::as_bytes))
    }

    pub fn create_tenant(&mut self, name: &str, status: &str) -> String {
        let reply = self.request(
            "POST",
            "/api/tenants",
            Some(json!({"name": name, "status": status})),
        );
        assert_eq!(reply.status, 201, "{}", reply.text());
        let id = reply.json()["id"].as_str().unwrap().to_string();
        self.created.push(id.clone());
        id
    }

    pub fn set_status(&self, tenant: &str, status: &str) {
        let reply = self.request(
            "PATCH",
            &format!("/api/tenants/{tenant}"),
            Some(json!({"status": status})),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
    }

    pub fn set_workers(&self, tenant: &str, workers: u16) {
        let reply = self.request(
            "PUT",
            &format!("/api/tenants/{tenant}/config/concurrency"),
            Some(json!({ "workers": workers })),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
    }

    pub fn rows(&self, pg: &mut Client) -> i64 {
        pg.query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get(0)
    }

    /// Deletes what the run made in the broker.
    fn clean_broker(&self) {
        let addr = tenantd::BrokerAddr::parse(&self.amqp_url).unwrap();
        let Ok(mut connection) =
            tenantd::connect_broker(&addr, Duration::from_secs(10), "bench cleanup")
        else {
            return;
        };
        let Ok(channel) = connection.open_channel(None) else {
            return;
        };
        for t in &self.created {
            for q in ["queue", "retry", "dlq"] {
                let name = format!("tenant_{t}_{q}");
                let _ = channel.queue_delete(name, amiquip::QueueDeleteOptions::default());
            }
        }
        let _ = connection.close();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Stopped first: a running consumer would declare its queues again.
        let names: Vec<String> = self.replicas.keys().cloned().collect();
        for name in names {
            self.signal(&name, "-KILL");
        }
        self.clean_broker();
    }
}
