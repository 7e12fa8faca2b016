//! tenantd installed on a VM: the Debian package and what it holds, the systemd unit as systemd
//! reads it, the service-manager notifications of the real binary (ready, watchdog fed only
//! while healthy, stopping), and the `tenantd check` preflight against real and closed ports.

use std::io::Write;
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::child::Tenantd;
use crate::support::proxy::Proxy;
use crate::support::{pg_host_port, pg_url_via, rabbitmq_url, TestDb};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A directory removed with everything in it when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("tenantd-it-{what}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `scripts/package.sh` on the binary the tests built (stripped of debug sections, gzip for
/// speed): the path of the `.deb` it printed last.
fn build_package(out: &Path) -> PathBuf {
    let built = run(Command::new(format!("{REPO}/scripts/package.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_tenantd"), "--out"])
        .arg(out)
        .env("DPKG_DEB_COMPRESSOR_TYPE", "gzip")
        .env("DPKG_DEB_COMPRESSOR_LEVEL", "1"));
    let last = stdout(&built)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    PathBuf::from(last)
}

#[test]
fn the_package_holds_the_binary_the_unit_and_the_env_file_as_a_conffile() {
    let dir = TempDir::new("package");
    let deb = build_package(&dir.0);
    let arch = stdout(&run(Command::new("dpkg").arg("--print-architecture")));
    let name = format!("tenantd_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim());
    assert_eq!(deb.file_name().unwrap().to_string_lossy(), name);
    assert!(deb.is_file(), "{deb:?}");

    let listing = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    let entry = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
            .to_string()
    };
    assert!(entry("/usr/bin/tenantd").starts_with("-rwxr-xr-x root/root"));
    assert!(entry("/usr/lib/systemd/system/tenantd.service").starts_with("-rw-r--r-- root/root"));
    // It will hold credentials: root's alone (systemd reads it before dropping to tenantd).
    assert!(entry("/etc/tenantd/tenantd.env").starts_with("-rw------- root/root"));
    entry("/usr/share/doc/tenantd/README.md");

    let conffiles = stdout(&run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles")));
    assert_eq!(conffiles.trim(), "/etc/tenantd/tenantd.env");
    let fields = stdout(&run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .args(["Package", "Version", "Depends"])));
    assert!(fields.contains("Package: tenantd"), "{fields}");
    assert!(fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))));
    assert!(fields.contains("libc6 (>="), "{fields}");
    for script in ["postinst", "prerm", "postrm"] {
        let text = stdout(&run(Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg(script)));
        let check = run(Command::new("sh").args(["-n", "-c", &text]));
        assert!(check.status.success(), "{script}");
    }
}

#[test]
fn the_packaged_unit_passes_systemd_analyze_verify() {
    let dir = TempDir::new("unit");
    let deb = build_package(&dir.0);
    let root = dir.0.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let units = root.join("usr/lib/systemd/system");
    let unit = std::fs::read_to_string(units.join("tenantd.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "EnvironmentFile=/etc/tenantd/tenantd.env",
        "ExecStartPre=/usr/bin/tenantd check",
        "LimitNOFILE=65536",
        "TasksMax=49152",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line} missing from the unit"
        );
    }
    // The targets every service depends on, as on any Debian system with systemd.
    for target in std::fs::read_dir("/usr/lib/systemd/system").expect("systemd's own units") {
        let path = target.unwrap().path();
        if path.extension().is_some_and(|e| e == "target") {
            std::fs::copy(&path, units.join(path.file_name().unwrap())).unwrap();
        }
    }
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("tenantd.service")
        .output()
        .expect("systemd-analyze (scripts/test.sh installs it)");
    // It exits 0 even for unknown keys: every line it says about the unit is a defect.
    let said = String::from_utf8_lossy(&verified.stderr).into_owned();
    assert!(verified.status.success(), "{said}");
    assert!(!said.contains("tenantd.service"), "{said}");
}

#[test]
fn the_env_file_lists_every_setting_with_its_default_and_parses() {
    let text = std::fs::read_to_string(format!("{REPO}/scripts/debian/tenantd.env")).unwrap();
    for s in tenantd::config::SETTINGS {
        let commented = format!("#{}={}", s.name, s.default);
        let set = format!("{}=", s.name);
        let line = text
            .lines()
            .find(|l| l.starts_with(&commented) || l.starts_with(&set))
            .unwrap_or_else(|| panic!("{} is not in the env file", s.name));
        assert!(
            line == commented || line.starts_with(&set),
            "{}: {line} (default {})",
            s.name,
            s.default
        );
    }
    let vars = tenantd::check::parse_env_file(&text);
    let config = tenantd::Config::from_lookup(|n| vars.get(n).cloned()).expect("it parses");
    assert_eq!(config.http_addr, "127.0.0.1:8080", "loopback unless told");
}

/// A service manager's notification socket: what tenantd sends to `NOTIFY_SOCKET`.
struct ServiceManager {
    socket: UnixDatagram,
    /// What `NOTIFY_SOCKET` says.
    target: String,
    _dir: Option<TempDir>,
}

impl ServiceManager {
    fn at_path() -> ServiceManager {
        let dir = TempDir::new("notify");
        let path = dir.0.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        ServiceManager {
            socket,
            target: path.display().to_string(),
            _dir: Some(dir),
        }
    }

    fn at_abstract_name() -> ServiceManager {
        let name = format!("tenantd-it-notify-{}", uuid::Uuid::new_v4().simple());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        ServiceManager {
            socket: UnixDatagram::bind_addr(&addr).unwrap(),
            target: format!("@{name}"),
            _dir: None,
        }
    }

    fn env(&self, watchdog: Duration) -> Vec<(&'static str, String)> {
        vec![
            ("NOTIFY_SOCKET", self.target.clone()),
            ("WATCHDOG_USEC", watchdog.as_micros().to_string()),
        ]
    }

    /// The next notification before `deadline`.
    fn next(&self, deadline: Instant) -> Option<String> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = vec![0; 4096];
        let len = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..len]).into_owned())
    }

    /// Notifications until one holds `line`; fails after `timeout` with what came.
    fn wait_for(&self, line: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(n) = self.next(deadline) {
            let found = n.lines().any(|l| l == line);
            seen.push(n);
            if found {
                return seen;
            }
        }
        panic!("no {line} within {timeout:?}; received {seen:?}");
    }

    /// Every notification within `window`.
    fn during(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        std::iter::from_fn(|| self.next(deadline)).collect()
    }
}

fn holds(notifications: &[String], line: &str) -> usize {
    notifications
        .iter()
        .filter(|n| n.lines().any(|l| l == line))
        .count()
}

#[test]
fn the_binary_says_ready_feeds_the_watchdog_and_says_stopping_on_sigterm() {
    let db = TestDb::create();
    let manager = ServiceManager::at_path();
    let mut env = vec![("DATABASE_URL", db.url()), ("RABBITMQ_URL", rabbitmq_url())];
    env.extend(manager.env(Duration::from_millis(400)));
    let mut child = Tenantd::start(&env);
    let first = manager.wait_for("READY=1", Duration::from_secs(30));
    assert_eq!(first.len(), 1, "READY=1 comes first: {first:?}");
    assert_eq!(child.request("GET", "/healthz", None).status, 200);
    // Fed every 200 ms, half the watchdog's timeout, with what runs here.
    let fed = manager.wait_for("WATCHDOG=1", Duration::from_secs(5));
    let fed = [fed, manager.wait_for("WATCHDOG=1", Duration::from_secs(5))].concat();
    assert!(
        fed.iter()
            .any(|n| n.contains("STATUS=0 tenants running here")),
        "{fed:?}"
    );
    child.signal("-TERM");
    let stopping = manager.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(!stopping.last().unwrap().contains("WATCHDOG=1"));
    assert_eq!(child.wait(Duration::from_secs(30)), Some(0));
    let after = manager.during(Duration::from_millis(300));
    assert_eq!(
        holds(&after, "WATCHDOG=1"),
        0,
        "fed after STOPPING=1: {after:?}"
    );
}

/// A database outage is no hang: the fence stops every consumer F/2 after the last heartbeat
/// and the replica waits, its threads coming round. systemd must not restart it (a restart
/// only adds a cold start, and fails while the database is down); the status says it waits.
#[test]
fn the_watchdog_is_fed_while_the_database_is_cut_and_every_consumer_is_stopped() {
    let db = TestDb::create();
    let proxy = Proxy::start(&pg_host_port());
    let manager = ServiceManager::at_abstract_name();
    let mut env = vec![
        ("DATABASE_URL", pg_url_via(proxy.port(), &db)),
        ("RABBITMQ_URL", rabbitmq_url()),
        // The coordinator's heartbeat is stale past F/2 = 1 s.
        ("FAILOVER_TIMEOUT", "2".to_string()),
        ("CONNECT_TIMEOUT_MS", "1000".to_string()),
    ];
    env.extend(manager.env(Duration::from_millis(400)));
    let mut child = Tenantd::start(&env);
    manager.wait_for("READY=1", Duration::from_secs(30));
    let created = child.request("POST", "/api/tenants", Some(r#"{"name":"waits"}"#));
    assert_eq!(created.status, 201, "{}", created.text());
    let tenant = created.json()["id"].as_str().unwrap().to_string();
    manager.wait_for("STATUS=1 tenant running here", Duration::from_secs(10));

    proxy.cut();
    let until_waiting = Instant::now() + Duration::from_secs(15);
    loop {
        let n = manager
            .next(until_waiting)
            .expect("a status that says it waits");
        if n.contains("STATUS=waiting for PostgreSQL") {
            assert!(n.contains("WATCHDOG=1"), "{n}");
            break;
        }
    }
    // Eight feeding periods, every one fed: systemd leaves it be.
    let waiting = manager.during(Duration::from_millis(1600));
    assert!(holds(&waiting, "WATCHDOG=1") >= 6, "{waiting:?}");

    proxy.restore();
    manager.wait_for("STATUS=1 tenant running here", Duration::from_secs(20));
    child.stop_cleanly("-TERM");
    crate::support::Amqp::connect().delete_tenant_queues(&tenant);
}

#[test]
fn the_watchdog_goes_unfed_while_the_http_front_cannot_answer() {
    let db = TestDb::create();
    let manager = ServiceManager::at_path();
    let mut env = vec![
        ("DATABASE_URL", db.url()),
        ("RABBITMQ_URL", rabbitmq_url()),
        ("HTTP_MAX_CONNECTIONS", "2".to_string()),
    ];
    env.extend(manager.env(Duration::from_millis(400)));
    let mut child = Tenantd::start(&env);
    manager.wait_for("WATCHDOG=1", Duration::from_secs(30));

    // Two requests that never finish their head hold both connections: the front answers
    // every other caller 503, as it would with tiny_http or the request threads wedged.
    let addr = child.base.trim_start_matches("http://").to_string();
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(&addr).unwrap();
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            stream
        })
        .collect();
    // Checked every 200 ms; the deadline only ends a test that would never see it (on a loaded
    // machine a slow loop is judged first, and the HTTP check comes after).
    let until_unhealthy = Instant::now() + Duration::from_secs(30);
    loop {
        let n = manager.next(until_unhealthy).expect("an unhealthy status");
        if n.contains("STATUS=unhealthy: HTTP does not answer /healthz") {
            assert!(n.contains("503") && !n.contains("WATCHDOG=1"), "{n}");
            break;
        }
    }
    let silent = manager.during(Duration::from_millis(1200));
    assert_eq!(holds(&silent, "WATCHDOG=1"), 0, "{silent:?}");

    drop(held);
    manager.wait_for("WATCHDOG=1", Duration::from_secs(10));
    child.stop_cleanly("-TERM");
}

fn check(env: &[(&str, String)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tenantd"))
        .arg("check")
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

#[test]
fn check_reaches_the_real_servers_and_shows_each_limit_as_tenants() {
    let db = TestDb::create();
    let env = [("DATABASE_URL", db.url()), ("RABBITMQ_URL", rabbitmq_url())];
    let started = Instant::now();
    let out = check(&env, &[]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "quick enough for ExecStartPre"
    );
    assert!(text.contains("PostgreSQL: reachable"), "{text}");
    assert!(text.contains("vhost /: reachable, RabbitMQ "), "{text}");
    for row in [
        "| tenantd's open files (RLIMIT_NOFILE) ",
        "| memory maps (vm.max_map_count) ",
        "| RabbitMQ's connections ",
        "| PostgreSQL's lock table ",
        "| PostgreSQL's max_connections ",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(row)),
            "{row} missing:\n{text}"
        );
    }
    assert!(text.contains(" × ("), "the lock table's arithmetic: {text}");
    assert!(text.contains("**"), "the fewest in bold:\n{text}");
    assert!(text.contains("\nThe tightest: "), "{text}");
}

#[test]
fn check_warns_of_a_low_file_limit_and_still_passes() {
    let db = TestDb::create();
    let file = TempDir::new("env-file");
    let env_file = file.0.join("tenantd.env");
    let settings = format!(
        "# as the package ships it, edited\nDATABASE_URL={}\nRABBITMQ_URL={}\n",
        db.url(),
        rabbitmq_url()
    );
    std::fs::write(&env_file, settings).unwrap();
    // 630 descriptors for tenantd itself by default, then 4 per tenant: (1000 - 630) / 4 = 92.
    let out = Command::new("/bin/sh")
        .args([
            "-c",
            "ulimit -n 1000 && exec \"$0\" check --env-file \"$1\"",
        ])
        .arg(env!("CARGO_BIN_EXE_tenantd"))
        .arg(&env_file)
        .env_clear()
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("PostgreSQL: reachable"), "{text}");
    assert!(text.contains("| **92** "), "{text}");
    assert!(
        text.contains("The tightest: tenantd's open files (RLIMIT_NOFILE), at about 92 tenants"),
        "{text}"
    );
}

#[test]
fn check_against_closed_ports_fails_with_the_reason() {
    let db = TestDb::create();
    let closed_db = [
        (
            "DATABASE_URL",
            "postgres://postgres:postgres@127.0.0.1:1/x".to_string(),
        ),
        ("RABBITMQ_URL", rabbitmq_url()),
    ];
    let out = check(&closed_db, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot connect to PostgreSQL at 127.0.0.1:1/x"),
        "{err}"
    );
    assert!(stdout(&out).contains("PostgreSQL: unreachable"));

    let closed_broker = [
        ("DATABASE_URL", db.url()),
        (
            "RABBITMQ_URL",
            "amqp://guest:guest@127.0.0.1:1/%2f".to_string(),
        ),
    ];
    let out = check(&closed_broker, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot connect to RabbitMQ at 127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("PostgreSQL"), "{err}");
    let text = stdout(&out);
    assert!(
        text.contains("| RabbitMQ's connections "),
        "the table still shows: {text}"
    );
}
