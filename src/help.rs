//! The text of `tenantd --help`: the commands, every setting from the settings table, and the
//! most a replica may hold in memory with the defaults.

use crate::config::{Config, SETTINGS};

pub fn help_text() -> String {
    let mut text = format!(
        "tenantd: multi-tenant message ingestion from RabbitMQ into partitioned PostgreSQL\n\n\
         Usage: tenantd [--help]\n       {}\n         prints a JWT signed with JWT_HS256_SECRET \
         (ttl default 1h)\n       {}\n         reaches PostgreSQL and RabbitMQ, prints what limits \
         the tenants this host can run\n\nSettings (environment variables):\n",
        crate::token::USAGE,
        crate::check::USAGE
    );
    for s in SETTINGS {
        let default = if s.default.is_empty() {
            "(unset)"
        } else {
            s.default
        };
        text.push_str(&format!(
            "  {:<24} {}\n  {:<24} default: {default}; {}\n",
            s.name, s.help, "", s.accepts
        ));
    }
    let defaults = Config::defaults();
    text.push_str(&crate::memory::worst_case(&crate::memory::Sizes {
        workers: usize::from(defaults.default_workers),
        batch: defaults.batch_size,
        message_bytes: defaults.max_message_bytes,
        connections: defaults.http_max_connections,
    }));
    text
}
