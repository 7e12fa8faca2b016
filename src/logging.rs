//! One line per event on stderr: time, level, thread, the HTTP request id when there is one, the
//! message, and the record's key-values (`tenant_id`, …); as text or as JSON. A text line stays
//! one line whatever it quotes: control characters, Unicode line and paragraph separators and
//! bidirectional overrides are escaped (`\n`, `\u{2028}`), so no input can forge a line.
//!
//! Our own logger rather than `simplelog`: it has neither JSON lines nor key-values, and the
//! request id comes from a thread-local set by the HTTP front.

use std::cell::RefCell;
use std::io::Write;

use chrono::{SecondsFormat, Utc};
use log::kv::{Key, Value, VisitSource};
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
        let line = format_record(self.format, record);
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    fn flush(&self) {}
}

/// The record's key-values, in order, as text.
struct Fields(Vec<(String, String)>);

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.push((key.to_string(), value.to_string()));
        Ok(())
    }
}

/// One line as tenantd writes it (public so tests can capture lines exactly as operators see them).
pub fn format_record(format: Format, record: &Record) -> String {
    let mut fields = Fields(Vec::new());
    let _ = record.key_values().visit(&mut fields);
    format_line(
        format,
        record.level(),
        &record.args().to_string(),
        &fields.0,
    )
}

fn format_line(format: Format, level: Level, message: &str, fields: &[(String, String)]) -> String {
    let time = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("-");
    let request_id = REQUEST_ID.with(|r| r.borrow().clone());
    match format {
        Format::Text => {
            let rid = request_id
                .map(|id| format!(" request_id={id}"))
                .unwrap_or_default();
            let kvs: String = fields
                .iter()
                .map(|(k, v)| format!(" {}={}", escaped(k), escaped(v)))
                .collect();
            format!(
                "{time} {level:<5} [{thread}]{rid} {}{kvs}",
                escaped(message)
            )
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
            for (key, value) in fields {
                line[key.as_str()] = value.as_str().into();
            }
            line.to_string()
        }
    }
}

/// `text` with every character that could break or disguise a line escaped as Rust does
/// (`\n`, `\u{1b}`, `\u{2028}`); the rest as it is.
fn escaped(text: &str) -> std::borrow::Cow<'_, str> {
    let breaks_a_line = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(breaks_a_line) {
        return text.into();
    }
    text.chars()
        .map(|c| match breaks_a_line(c) {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect::<String>()
        .into()
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

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn json_lines_carry_the_request_and_the_key_values() {
        set_request_id(Some("r-1"));
        let tenant = "2a7a0324-8118-4e0a-9699-35c1ca694c2e";
        let line = format_line(
            Format::Json,
            Level::Info,
            "tenant created",
            &fields(&[("tenant_id", tenant), ("status", "active")]),
        );
        set_request_id(None);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["tenant_id"], tenant);
        assert_eq!(v["status"], "active");
        assert_eq!(v["message"], "tenant created");
        assert_eq!(v["level"], "INFO");
    }

    #[test]
    fn text_lines_are_one_line_with_time_level_thread_and_key_values() {
        let line = format_line(
            Format::Text,
            Level::Warn,
            "hello",
            &fields(&[("tenant_id", "t")]),
        );
        assert!(
            line.contains(" WARN  [") && line.ends_with("] hello tenant_id=t"),
            "{line}"
        );
    }

    #[test]
    fn text_lines_stay_one_line_whatever_they_quote() {
        let forged = "a\n2026-01-01T00:00:00Z INFO  [main] forged\rb\u{2028}c\u{2029}d\u{1b}[31me\u{202e}f\u{85}";
        let line = format_line(
            Format::Text,
            Level::Info,
            forged,
            &fields(&[("reason", "x\ny"), ("k\n", "v")]),
        );
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(!line.contains(['\r', '\u{2028}', '\u{2029}', '\u{1b}', '\u{202e}', '\u{85}']));
        assert!(
            line.ends_with(
                "a\\n2026-01-01T00:00:00Z INFO  [main] forged\\rb\\u{2028}c\\u{2029}d\\u{1b}[31me\\u{202e}f\\u{85} reason=x\\ny k\\n=v"
            ),
            "{line}"
        );
        let plain = format_line(Format::Text, Level::Info, "tenant «ü» ok", &[]);
        assert!(plain.ends_with("tenant «ü» ok"), "{plain}");
    }
}
