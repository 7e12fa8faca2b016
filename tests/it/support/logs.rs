//! Captures tenantd's log lines in memory, so tests can assert what an operator would read.

use std::sync::OnceLock;

use log::{Log, Metadata, Record};
use parking_lot::Mutex;
use tenantd::logging::Format;

struct Capture {
    lines: Mutex<Vec<String>>,
}

static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();

impl Log for Capture {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.target().starts_with("tenantd")
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let line = tenantd::logging::format_record(Format::Text, record);
            if std::env::var_os("TENANTD_TEST_LOG").is_some() {
                eprintln!("{line}");
            }
            self.lines.lock().push(line);
        }
    }

    fn flush(&self) {}
}

/// Installs the capturing logger once per test binary.
pub fn capture() {
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture {
            lines: Mutex::new(Vec::new()),
        }));
        log::set_logger(capture).expect("no other logger");
        log::set_max_level(log::LevelFilter::Info);
        capture
    });
}

/// Every captured line containing all of `needles`.
pub fn lines_with(needles: &[&str]) -> Vec<String> {
    let capture = CAPTURE.get().expect("capture() first");
    let lines = capture.lines.lock();
    lines
        .iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .cloned()
        .collect()
}
