//! tenantd as an operator runs it: the real binary in a child process, its log collected, so a
//! test can SIGTERM or SIGKILL it and read what it said.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;

pub struct Tenantd {
    process: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Disconnects once the reader has taken the last line of the log (EOF): after an exit,
    /// `wait` waits for it, so that no test reads a log whose end is still in the pipe.
    log_complete: Receiver<()>,
    pub base: String,
}

impl Tenantd {
    /// Starts the binary with these settings (HTTP on an ephemeral port) and waits until it
    /// listens.
    pub fn start(env: &[(&str, String)]) -> Tenantd {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantd"));
        cmd.env_clear()
            .env("HTTP_ADDR", "127.0.0.1:0")
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut process = cmd.spawn().expect("starting tenantd");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = process.stderr.take().unwrap();
        let sink = log.clone();
        let (reading, log_complete) = crossbeam_channel::bounded::<()>(0);
        std::thread::spawn(move || {
            let _reading = reading;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().push(line);
            }
        });
        let mut child = Tenantd {
            process,
            log,
            log_complete,
            base: String::new(),
        };
        child.base = child.wait_for_listening();
        child
    }

    fn wait_for_listening(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Text or JSON logs: the address runs to the next blank or quote.
            let found = self.lines().iter().find_map(|l| {
                let rest = l.split("listening on ").nth(1)?;
                Some(
                    rest.chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect::<String>(),
                )
            });
            if let Some(base) = found {
                return base;
            }
            if let Some(status) = self.process.try_wait().unwrap() {
                panic!(
                    "tenantd exited with {status} before listening: {:?}",
                    self.lines()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tenantd never listened: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().clone()
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.process.id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Waits for the process to exit and for its log to be read to the end; its exit code
    /// (`None` when killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                self.wait_for_log_end(deadline);
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "tenantd did not exit: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for_log_end(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        match self
            .log_complete
            .recv_timeout(left.max(Duration::from_secs(5)))
        {
            Err(RecvTimeoutError::Disconnected) => {}
            _ => panic!("tenantd exited but its log never ended: {:?}", self.lines()),
        }
    }

    /// Sends `signal` and asserts a clean exit (status 0); returns the whole log.
    pub fn stop_cleanly(&mut self, signal: &str) -> String {
        self.signal(signal);
        let status = self.wait(Duration::from_secs(30));
        assert_eq!(status, Some(0), "{:?}", self.lines());
        self.lines().join("\n")
    }

    pub fn kill(&mut self) {
        self.signal("-KILL");
        self.wait(Duration::from_secs(10));
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> super::Reply {
        super::http::request(&self.base, method, path, body.map(str::as_bytes))
    }
}

impl Drop for Tenantd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
