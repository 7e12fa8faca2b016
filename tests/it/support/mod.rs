//! What every test needs: a fresh database, the real tenantd on an ephemeral port, an HTTP
//! client, an AMQP publisher, a TCP proxy to cut, captured log lines, and deadline waits.

pub mod amqp;
pub mod child;
pub mod http;
pub mod logs;
pub mod proxy;
pub mod tokens;
pub mod vhost;

use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::Value;
use tenantd::Config;
use uuid::Uuid;

pub use self::amqp::Amqp;
pub use self::http::Reply;

/// The PostgreSQL server the tests create their databases on (no database name).
pub fn pg_server() -> String {
    std::env::var("TENANTD_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into())
}

pub fn rabbitmq_url() -> String {
    std::env::var("TENANTD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `host:port` of the PostgreSQL server, for a proxy in front of it.
pub fn pg_host_port() -> String {
    let server = pg_server();
    let after_at = server.rsplit('@').next().unwrap_or(&server);
    after_at.trim_start_matches("postgres://").to_string()
}

/// `host:port` of the RabbitMQ server, for a proxy in front of it.
pub fn amqp_host_port() -> String {
    let url = rabbitmq_url();
    let after_at = url.rsplit('@').next().unwrap_or(&url);
    after_at.split('/').next().unwrap_or(after_at).to_string()
}

/// The PostgreSQL URL of `db` reached through a proxy listening on `port`.
pub fn pg_url_via(port: u16, db: &TestDb) -> String {
    pg_server().replace(&pg_host_port(), &format!("127.0.0.1:{port}")) + "/" + &db.name
}

/// The RabbitMQ URL reached through a proxy listening on `port`.
pub fn amqp_url_via(port: u16) -> String {
    rabbitmq_url().replace(&amqp_host_port(), &format!("127.0.0.1:{port}"))
}

pub fn pg_admin() -> Client {
    let url = format!("{}/postgres", pg_server());
    Client::connect(&url, NoTls).unwrap_or_else(|e| {
        panic!("PostgreSQL is unreachable at {url}: {e} (scripts/test.sh starts it)")
    })
}

/// Polls `check` until it is true; fails the test with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A throwaway database, dropped with everything in it when the test ends.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub fn create() -> TestDb {
        let name = format!("tenantd_it_{}", Uuid::new_v4().simple());
        pg_admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("creating a test database");
        TestDb { name }
    }

    pub fn url(&self) -> String {
        format!("{}/{}", pg_server(), self.name)
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.url(), NoTls).expect("connecting to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = pg_admin().batch_execute(&sql);
    }
}

/// tenantd running in this process against its own database.
pub struct TestApp {
    pub app: Option<tenantd::App>,
    pub config: Config,
    pub db: TestDb,
    pub amqp: Amqp,
}

impl TestApp {
    pub fn spawn() -> TestApp {
        TestApp::spawn_with(|_| {})
    }

    pub fn spawn_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
        logs::capture();
        let amqp = Amqp::connect();
        let db = TestDb::create();
        let mut config = test_config(&db);
        adjust(&mut config);
        let app = tenantd::start(config.clone()).expect("tenantd starts");
        TestApp {
            app: Some(app),
            config,
            db,
            amqp,
        }
    }

    /// Stops tenantd the way SIGTERM does and starts it again on the same database.
    pub fn restart(&mut self) {
        self.stop();
        self.app = Some(tenantd::start(self.config.clone()).expect("tenantd restarts"));
    }

    pub fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().expect("clean shutdown");
        }
    }

    pub fn base(&self) -> String {
        let addr = self.app.as_ref().expect("running").http_addr();
        format!("http://{addr}")
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        http::request(&self.base(), method, path, body.map(str::as_bytes))
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None)
    }

    /// Creates a tenant with this name and body extras; asserts 201 and returns its JSON.
    pub fn create_tenant_with(&self, body: Value) -> Value {
        let reply = self.request("POST", "/api/tenants", Some(&body.to_string()));
        assert_eq!(reply.status, 201, "creating a tenant: {}", reply.text());
        reply.json()
    }

    pub fn create_tenant(&self, name: &str) -> String {
        let tenant = self.create_tenant_with(serde_json::json!({ "name": name }));
        tenant["id"].as_str().expect("id").to_string()
    }

    pub fn pg(&self) -> Client {
        self.db.client()
    }

    /// Rows of the tenant's partition, read from the partition table itself.
    pub fn partition_rows(&self, tenant: &str) -> i64 {
        let table = partition_name(tenant);
        self.pg()
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .expect("counting partition rows")
            .get(0)
    }

    pub fn total_rows(&self) -> i64 {
        self.pg()
            .query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get(0)
    }

    pub fn wait_rows(&self, tenant: &str, n: i64) {
        wait_until(
            Duration::from_secs(30),
            &format!("{n} rows for {tenant}"),
            || self.partition_rows(tenant) >= n,
        );
        assert_eq!(self.partition_rows(tenant), n, "rows of {tenant}");
    }

    pub fn tenant_ids(&self) -> Vec<String> {
        self.pg()
            .query("SELECT id::text FROM tenants", &[])
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let tenants = self.tenant_ids();
        if let Some(app) = self.app.take() {
            let _ = app.shutdown();
        }
        for id in tenants {
            self.amqp.delete_tenant_queues(&id);
        }
    }
}

pub fn test_config(db: &TestDb) -> Config {
    let mut config = Config::from_lookup(|_| None).expect("default config");
    config.database_url = db.url();
    config.rabbitmq_url = rabbitmq_url();
    config.http_addr = "127.0.0.1:0".into();
    config.pool_size = 4;
    config.shutdown_timeout = Duration::from_secs(10);
    config.connect_timeout = Duration::from_secs(3);
    config
}

/// Holds an ACCESS EXCLUSIVE lock on the tenant's partition until the transaction ends: every
/// insert into it waits (a database stalled, for one tenant).
pub fn lock_partition<'a>(pg: &'a mut Client, tenant: &str) -> postgres::Transaction<'a> {
    let mut lock = pg.transaction().unwrap();
    let sql = format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        partition_name(tenant)
    );
    lock.batch_execute(&sql).unwrap();
    lock
}

pub fn partition_name(tenant: &str) -> String {
    format!("messages_{}", tenant.replace('-', "_"))
}

pub fn queue_name(tenant: &str) -> String {
    format!("tenant_{tenant}_queue")
}

pub fn retry_name(tenant: &str) -> String {
    format!("tenant_{tenant}_retry")
}

pub fn dlq_name(tenant: &str) -> String {
    format!("tenant_{tenant}_dlq")
}

/// Threads of this process whose name is `name` (Linux truncates names to 15 bytes).
pub fn threads_named(name: &str) -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// CPU ticks (1/100 s) used so far by this process's threads named `name`.
pub fn thread_ticks(name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        total += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    total
}

pub fn tenant_thread(tenant: &str) -> String {
    format!("tenant-{}", &tenant.replace('-', "")[..8])
}
