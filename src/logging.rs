//! One log line per event on stderr: time, level, thread, message.

use log::LevelFilter;
use simplelog::{ConfigBuilder, ThreadLogMode, WriteLogger};

/// Installs the logger; a second call (as in tests) keeps the first.
pub fn init(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Error)
        .set_thread_mode(ThreadLogMode::Names)
        .set_thread_padding(simplelog::ThreadPadding::Off)
        .set_target_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .build();
    let _ = WriteLogger::init(level, config, std::io::stderr());
}
