//! The soak's three tenantd replicas, each reaching PostgreSQL and RabbitMQ through TCP proxies
//! of its own, so that one replica's path to one server can be cut alone; and the signals that
//! kill, stop and continue them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use parking_lot::Mutex;

use super::proxy::Proxy;
use super::servers::{Servers, AMQP_PORT, PG_PORT};
use super::Settings;
use crate::stack::Stack;

pub const NAMES: [&str; 3] = ["r1", "r2", "r3"];

#[derive(Clone, Copy, PartialEq)]
enum State {
    Up,
    Killed,
    Stopped,
}

/// One replica's paths to the servers.
struct Paths {
    db: Proxy,
    broker: Proxy,
}

pub struct Fleet {
    stack: Mutex<Stack>,
    paths: Vec<Paths>,
    env: Vec<(&'static str, String)>,
    states: Mutex<[State; 3]>,
    /// Every replica process started is noted here (see `Servers::replica_pids`).
    pids: PathBuf,
}

impl Fleet {
    /// A fresh database on the private server, and the three replicas running on it.
    pub fn start(servers: &Servers, settings: &Settings, logs: &Path) -> Fleet {
        let (pg_server, amqp_url) = (&servers.pg_server(), &servers.amqp_url());
        let mut stack = Stack::new(pg_server, amqp_url);
        stack.replica_logs = Some(logs.to_path_buf());
        let paths = NAMES
            .iter()
            .map(|_| Paths {
                db: Proxy::start(&format!("127.0.0.1:{PG_PORT}")),
                broker: Proxy::start(&format!("127.0.0.1:{AMQP_PORT}")),
            })
            .collect();
        let env = vec![
            ("FAILOVER_TIMEOUT", settings.failover.as_secs().to_string()),
            (
                "BROKER_HEARTBEAT_SECS",
                settings.heartbeat.as_secs().to_string(),
            ),
            ("RETRY_DELAYS_MS", "200,200".to_string()),
            ("WORKER_POOL_SIZE", "2".to_string()),
            ("CONNECT_TIMEOUT_MS", "2000".to_string()),
            ("LOG_LEVEL", "info".to_string()),
        ];
        let fleet = Fleet {
            stack: Mutex::new(stack),
            paths,
            env,
            states: Mutex::new([State::Up; 3]),
            pids: servers.replica_pids(),
        };
        for i in 0..NAMES.len() {
            fleet.launch(i);
        }
        fleet
    }

    fn launch(&self, i: usize) {
        let mut stack = self.stack.lock();
        let db = format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.paths[i].db.port(),
            stack.db_name
        );
        let broker = format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.paths[i].broker.port()
        );
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend([
            ("DATABASE_URL", db.as_str()),
            ("RABBITMQ_URL", broker.as_str()),
        ]);
        stack.start_replica(NAMES[i], &env);
        let pid = stack.replica(NAMES[i]).pid();
        let noted = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.pids);
        let _ = noted.and_then(|mut f| writeln!(f, "{pid}"));
        self.states.lock()[i] = State::Up;
    }

    /// SIGKILL, waiting for the process to be gone.
    pub fn kill(&self, i: usize) {
        self.states.lock()[i] = State::Killed;
        self.stack.lock().signal(NAMES[i], "-KILL");
    }

    /// Starts a killed replica again, with the same name and paths.
    pub fn restart(&self, i: usize) {
        self.launch(i);
    }

    /// SIGSTOP: the process keeps its sockets, and its kernel answers for them.
    pub fn freeze(&self, i: usize) {
        self.states.lock()[i] = State::Stopped;
        self.send(i, "-STOP");
    }

    pub fn thaw(&self, i: usize) {
        self.send(i, "-CONT");
        self.states.lock()[i] = State::Up;
    }

    fn send(&self, i: usize, signal: &str) {
        let pid = self.stack.lock().replica(NAMES[i]).pid().to_string();
        let status = Command::new("kill").args([signal, &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal} {pid}");
    }

    /// Every connection of the replica to PostgreSQL dropped, new ones refused.
    pub fn cut_db(&self, i: usize) {
        self.paths[i].db.cut();
    }

    pub fn cut_broker(&self, i: usize) {
        self.paths[i].broker.cut();
    }

    pub fn restore(&self, i: usize) {
        self.paths[i].db.restore();
        self.paths[i].broker.restore();
    }

    /// The HTTP address of a replica that can answer, chosen at random (`None` when none is
    /// running). A stopped replica would hold the caller until it continues.
    pub fn any_base(&self, rng: &mut fastrand::Rng) -> Option<String> {
        let states = *self.states.lock();
        let up: Vec<usize> = (0..NAMES.len())
            .filter(|&i| states[i] == State::Up)
            .collect();
        let i = *up.get(rng.usize(..up.len().max(1)))?;
        let stack = self.stack.lock();
        Some(stack.replica(NAMES[i]).base.clone())
    }

    /// The replica's address, when it is up.
    pub fn base(&self, i: usize) -> Option<String> {
        let up = self.states.lock()[i] == State::Up;
        up.then(|| self.stack.lock().replica(NAMES[i]).base.clone())
    }

    /// A session on the soak's database, directly (not through any replica's path).
    pub fn pg(&self) -> postgres::Client {
        self.stack.lock().pg()
    }

    pub fn pg_url(&self) -> String {
        let stack = self.stack.lock();
        format!("{}/{}", stack.pg_server, stack.db_name)
    }
}

/// How long a lifecycle call may wait for its answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);
