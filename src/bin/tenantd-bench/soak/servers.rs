//! The soak's own PostgreSQL and RabbitMQ, which it stops and starts: ports of their own
//! (5491, 5691 and 25691 for the node's distribution), everything under one directory, never the
//! shared servers. Stopped and removed when dropped, on every path; a run killed before it could
//! clean up is cleaned up by the next, and a lock file keeps two soaks on one machine apart.

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PG_PORT: u16 = 5491;
pub const AMQP_PORT: u16 = 5691;
const DIST_PORT: u16 = 25691;
const NODE: &str = "tenantd-soak@localhost";
/// Debian's scripts: the ones in /usr/sbin switch to the rabbitmq user and its cookie.
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

const NEEDS: &str = "the soak runs private servers: it needs PostgreSQL's server programs \
    (initdb and pg_ctl, in /usr/lib/postgresql/*/bin or on PATH: apt-get install postgresql) and \
    RabbitMQ's (/usr/lib/rabbitmq/bin: apt-get install rabbitmq-server), and ports 5491, 5691 \
    and 25691 free";

pub struct Servers {
    dir: PathBuf,
    pg_bin: PathBuf,
    /// Whether PostgreSQL must run as the `postgres` user (we are root).
    as_postgres: bool,
    broker: Option<Child>,
    /// Held for the whole run; dropped last.
    _lock: File,
}

impl Servers {
    /// Starts both servers from empty data directories.
    pub fn start() -> Servers {
        let tmp = std::env::temp_dir();
        let lock = lock(&tmp.join("tenantd-soak.lock"));
        let dir = tmp.join("tenantd-soak");
        let pg_bin = pg_bin().unwrap_or_else(|| panic!("{NEEDS}"));
        assert!(
            Path::new(RABBITMQ_BIN).join("rabbitmq-server").exists(),
            "{NEEDS}"
        );
        let as_postgres = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let mut servers = Servers {
            dir,
            pg_bin,
            as_postgres,
            broker: None,
            _lock: lock,
        };
        servers.remove_leftovers();
        for port in [PG_PORT, AMQP_PORT, DIST_PORT] {
            assert!(!port_open(port), "port {port} is in use: {NEEDS}");
        }
        servers.init_pg();
        servers.start_pg();
        servers.init_broker();
        servers.start_broker();
        servers
    }

    /// Where the soak notes its replicas' process ids, so that replicas a killed run left
    /// running are stopped by the next.
    pub fn replica_pids(&self) -> PathBuf {
        self.dir.join("replicas.pids")
    }

    /// The PostgreSQL server, without a database name (trust authentication).
    pub fn pg_server(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{PG_PORT}")
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{AMQP_PORT}/%2f")
    }

    pub fn start_pg(&self) {
        let options = format!(
            "-p {PG_PORT} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c max_connections=300",
            self.pg_dir().display()
        );
        let log = self.pg_dir().join("log");
        let data = self.pg_dir().join("data");
        self.pg_ctl(&["-D", path(&data), "-l", path(&log), "-w", "-t", "60"])
            .args(["-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
            .unwrap_or_else(|| panic!("PostgreSQL did not start: see {}", log.display()));
    }

    /// A clean, fast shutdown: sessions are ended, then the server stops.
    pub fn stop_pg(&self) {
        self.stop_pg_with("fast");
    }

    fn stop_pg_with(&self, mode: &str) {
        let data = self.pg_dir().join("data");
        let _ = self
            .pg_ctl(&["-D", path(&data), "-m", mode, "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    pub fn start_broker(&mut self) {
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.mq_dir().join("stdout"))
            .expect("the broker's output file");
        // Started as root the broker gets 1024 files; the hard limit, as scripts/services.sh.
        let raise = r#"ulimit -S -n "$(ulimit -H -n)" 2>/dev/null; exec setsid "$0""#;
        let child = self
            .broker_env(&mut Command::new("sh"))
            .args(["-c", raise, &format!("{RABBITMQ_BIN}/rabbitmq-server")])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("a file handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting RabbitMQ: {e} ({NEEDS})"));
        self.broker = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while !port_open(AMQP_PORT) {
            let exited = self
                .broker
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = self.mq_dir().join("stdout");
                panic!("RabbitMQ did not start: see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(100)); // boot takes seconds
        }
    }

    /// A clean shutdown of the node, waiting until its process is gone.
    pub fn stop_broker(&mut self) {
        let Some(mut child) = self.broker.take() else {
            return;
        };
        let stopped = self
            .ctl(&["stop", path(&self.mq_dir().join("pid"))])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// The node's process killed: at the end, when its data goes too.
    fn kill_broker(&mut self) {
        let Some(mut child) = self.broker.take() else {
            return;
        };
        // The script started the node as a child of its own and waits for it.
        let pid = fs::read_to_string(self.mq_dir().join("pid")).unwrap_or_default();
        if !pid.trim().is_empty() {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `(name, messages ready + unacked, consumers)` of every queue, from the node itself.
    pub fn queues(&self) -> Vec<(String, u64, u64)> {
        let args = [
            "list_queues",
            "name",
            "messages",
            "consumers",
            "--no-table-headers",
        ];
        let out = self.ctl(&args).stdout(Stdio::piped()).output();
        let out = out.expect("rabbitmqctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let name = fields.next()?.to_string();
                Some((
                    name,
                    fields.next()?.parse().ok()?,
                    fields.next()?.parse().ok()?,
                ))
            })
            .collect()
    }

    fn pg_dir(&self) -> PathBuf {
        self.dir.join("pg")
    }

    fn mq_dir(&self) -> PathBuf {
        self.dir.join("mq")
    }

    /// pg_ctl, as the `postgres` user when we are root (PostgreSQL refuses to run as root).
    fn pg_ctl(&self, args: &[&str]) -> Command {
        self.pg_command("pg_ctl", args)
    }

    fn pg_command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.pg_bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        cmd.args(args);
        cmd
    }

    fn init_pg(&self) {
        let dir = self.pg_dir();
        fs::create_dir_all(&dir).expect("the PostgreSQL directory");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        if self.as_postgres {
            run(
                Command::new("chown").args(["-R", "postgres:", path(&dir)]),
                "chown",
            );
        }
        let data = dir.join("data");
        let args = ["-D", path(&data), "-A", "trust", "-U", "postgres"];
        let mut initdb = self.pg_command("initdb", &args);
        initdb
            .args(["--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null());
        run(&mut initdb, "initdb");
    }

    fn init_broker(&self) {
        let dir = self.mq_dir();
        for sub in ["mnesia", "log", "conf.d"] {
            fs::create_dir_all(dir.join(sub)).expect("the RabbitMQ directories");
        }
        let cookie = dir.join(".erlang.cookie");
        fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string()).expect("the cookie");
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400)).expect("chmod");
        fs::write(dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        fs::write(dir.join("rabbitmq-env.conf"), "").expect("rabbitmq-env.conf");
        fs::write(dir.join("rabbitmq.conf"), "loopback_users = none\n").expect("rabbitmq.conf");
    }

    /// The node's environment: its own HOME (and cookie), ports, directories and config, so
    /// neither the node nor a CLI call ever reaches the system broker.
    fn broker_env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let dir = self.mq_dir();
        let sub = |name: &str| dir.join(name);
        cmd.env("HOME", &dir)
            .env("RABBITMQ_NODENAME", NODE)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", AMQP_PORT.to_string())
            .env("RABBITMQ_DIST_PORT", DIST_PORT.to_string())
            .env("RABBITMQ_MNESIA_BASE", sub("mnesia"))
            .env("RABBITMQ_LOG_BASE", sub("log"))
            .env("RABBITMQ_PID_FILE", sub("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", sub("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", sub("rabbitmq.conf"))
            .env("RABBITMQ_CONFIG_FILES", sub("conf.d"))
            .env("RABBITMQ_CONF_ENV_FILE", sub("rabbitmq-env.conf"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(format!("{RABBITMQ_BIN}/rabbitmqctl"));
        self.broker_env(&mut cmd)
            .args(["-q", "-n", NODE])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// What a run that was killed left behind: its replicas and servers stopped, its directory
    /// removed.
    fn remove_leftovers(&mut self) {
        if !self.dir.exists() {
            return;
        }
        eprintln!(
            "  removing a previous soak's servers in {}",
            self.dir.display()
        );
        let pids = fs::read_to_string(self.replica_pids()).unwrap_or_default();
        for pid in pids.split_whitespace() {
            // Only a tenantd: the id may have gone to another process since.
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim_end() == "tenantd" {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        self.stop_pg_with("immediate");
        let pid_file = self.mq_dir().join("pid");
        if pid_file.exists() {
            let _ = self.ctl(&["stop", path(&pid_file)]).status();
        }
        fs::remove_dir_all(&self.dir).expect("removing the previous soak's directory");
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let started = Instant::now();
        self.kill_broker();
        self.stop_pg_with("immediate");
        let _ = fs::remove_dir_all(&self.dir);
        let took = started.elapsed().as_secs_f64();
        eprintln!("  the soak's servers are stopped and removed ({took:.1} s)");
    }
}

/// Takes the machine-wide soak lock, or says who holds it.
fn lock(path: &Path) -> File {
    let file = File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if file.try_lock().is_err() {
        panic!(
            "another soak is running on this machine (it holds {})",
            path.display()
        );
    }
    file
}

/// The newest PostgreSQL's programs: Debian's versioned directory, else those on PATH.
fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let on_path = Command::new("pg_ctl").arg("--version").output().ok()?;
    on_path.status.success().then(PathBuf::new)
}

fn run(cmd: &mut Command, what: &str) {
    let ok = cmd.status().is_ok_and(|s| s.success());
    assert!(ok, "{what} failed: {NEEDS}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

pub fn port_open(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}
