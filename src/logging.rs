//! One log line per event on stderr: time, level, thread, the HTTP request id when there is one,
//! and the message (which names `tenant_id=` where there is one); as text or as JSON.

use std::cell::RefCell;
use std::io::Write;

use chrono::{SecondsFormat, Utc};
use log::{Level, LevelFilter, Log, Metadata, Record};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

thread_local! {
    static REQUEST_ID: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Tags this thread's log lines with `id` until it is set again (to `None` when the request ends).
pub fn set_request_id(id: Option<&str>) {
    REQUEST_ID.with(|r| *r.borrow_mut() = id.map(str::to_string));
}

struct Logger {
    level: LevelFilter,
    format: Format,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // Our own lines at the chosen level; the libraries' only when they warn, except
        // tiny_http's accept errors, which the HTTP front reports (and handles) itself.
        let target = metadata.target();
        let ours = target.starts_with("tenantd");
        let library = metadata.level() <= Level::Warn && !target.starts_with("tiny_http");
        metadata.level() <= self.level && (ours || library)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(self.format, record.level(), &record.args().to_string());
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    fn flush(&self) {}
}

/// One line as tenantd writes it (public so tests can capture lines exactly as operators see them).
pub fn format_line(format: Format, level: Level, message: &str) -> String {
    let time = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("-");
    let request_id = REQUEST_ID.with(|r| r.borrow().clone());
    match format {
        Format::Text => {
            let rid = request_id
                .map(|id| format!(" request_id={id}"))
                .unwrap_or_default();
            format!("{time} {level:<5} [{thread}]{rid} {message}")
        }
        Format::Json => {
            let mut line = serde_json::json!({
                "time": time,
                "level": level.as_str(),
                "thread": thread,
                "message": message,
            });
            if let Some(id) = request_id {
                line["request_id"] = id.into();
            }
            if let Some(tenant) = tenant_of(message) {
                line["tenant_id"] = tenant.into();
            }
            line.to_string()
        }
    }
}

/// The `tenant_id=<uuid>` a message names, if any.
fn tenant_of(message: &str) -> Option<&str> {
    let rest = message.split("tenant_id=").nth(1)?;
    rest.get(..36)
}

/// Installs the logger; a second call (as in tests) keeps the first.
pub fn init(level: LevelFilter, format: Format) {
    let logger = Box::new(Logger { level, format });
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_the_request_and_tenant() {
        set_request_id(Some("r-1"));
        let line = format_line(
            Format::Json,
            Level::Info,
            "tenant created tenant_id=2a7a0324-8118-4e0a-9699-35c1ca694c2e status=active",
        );
        set_request_id(None);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["tenant_id"], "2a7a0324-8118-4e0a-9699-35c1ca694c2e");
        assert_eq!(v["level"], "INFO");
    }

    #[test]
    fn text_lines_are_one_line_with_time_level_and_thread() {
        let line = format_line(Format::Text, Level::Warn, "hello");
        assert!(
            line.contains(" WARN  [") && line.ends_with("] hello"),
            "{line}"
        );
    }
}
