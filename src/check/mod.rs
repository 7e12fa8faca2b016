//! `tenantd check`: the preflight an operator runs before starting tenantd, and the unit runs as
//! `ExecStartPre`. With the same settings as tenantd it reaches PostgreSQL and RabbitMQ, then
//! prints what bounds the number of tenants this host can run, each limit as a number of
//! tenants. It fails (exit 1, with the reason) only when a dependency cannot be reached: a low
//! limit is a warning, so a start is never refused for one. It changes nothing anywhere.

mod host;
mod rabbitmq;
mod rows;
mod table;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::broker::Brokers;
use crate::store::{self, limits::ServerLimits, DbSettings};
use crate::Config;
use rows::Inputs;
use table::Limit;

/// How `tenantd check` is called.
pub const USAGE: &str = "tenantd check [--env-file <file>]";

/// Runs the preflight; `Err` names every dependency that could not be reached.
pub fn run(args: &[String]) -> Result<()> {
    let Some(env_file) = parse(args)? else {
        println!(
            "Usage: {USAGE}\nReaches PostgreSQL and RabbitMQ with tenantd's settings (from the \
             environment, or the file first) and prints what limits the tenants this host can run"
        );
        return Ok(());
    };
    let config = settings(env_file.as_deref())?;
    let source = match &env_file {
        Some(file) => format!("{} and the environment", file.display()),
        None => "the environment".into(),
    };
    println!("tenantd check, with the settings of {source}\n");
    let mut failures = Vec::new();
    let mut warnings = Vec::new();

    let postgres = postgres_limits(&config);
    match &postgres {
        Ok(s) => println!("PostgreSQL: reachable, {}{}", s.version, tenants(s)),
        Err(e) => {
            println!("PostgreSQL: unreachable: {e:#}");
            failures.push(format!("{e:#}"));
        }
    }
    let brokers = Brokers::parse(&config.rabbitmq_url)?;
    let reached = rabbitmq::reach(&brokers, config.connect_timeout);
    for r in &reached {
        match &r.version {
            Ok(version) => println!("RabbitMQ {}: reachable, RabbitMQ {version}", r.broker),
            Err(e) => {
                println!("RabbitMQ {}: unreachable: {e:#}", r.broker);
                warnings.push(format!("{e:#}"));
            }
        }
    }
    let version = reached.iter().find_map(|r| r.version.as_ref().ok());
    if version.is_none() {
        failures.append(&mut warnings);
    }

    let broker = rabbitmq::connection_limit(&brokers, version.map(String::as_str));
    let server = postgres.as_ref().ok();
    let limits = rows::limits(&Inputs {
        config: &config,
        postgres: server,
        broker: &broker,
        broker_here: broker_here(&brokers),
    });
    let tightest = rows::tightest(&limits);
    println!("\nWhat limits the tenants one tenantd can run on this host:\n");
    let terminal = std::io::stdout().is_terminal();
    print!(
        "{}",
        table::render(&limits, tightest.as_ref().map(|t| t.0), terminal)
    );
    match &tightest {
        Some((fewest, bound)) => println!(
            "\nThe tightest: {}, at about {} tenants.",
            names(bound),
            table::count(*fewest)
        ),
        None => println!("\nCould not tell how many tenants this host can run."),
    }
    warnings.extend(low_limits(server, tightest.as_ref(), &config));
    for warning in &warnings {
        println!("warning: {warning}");
    }
    match failures.is_empty() {
        true => Ok(()),
        false => bail!("{}", failures.join("; ")),
    }
}

/// `Some(env file)` to run, `None` for `--help`.
fn parse(args: &[String]) -> Result<Option<Option<PathBuf>>> {
    match args {
        [] => Ok(Some(None)),
        [flag] if flag == "--help" || flag == "-h" => Ok(None),
        [flag, file] if flag == "--env-file" => Ok(Some(Some(file.into()))),
        _ => bail!("unexpected arguments {args:?}; {USAGE}"),
    }
}

/// tenantd's settings: the env file's first (as systemd's `EnvironmentFile=` gives them to the
/// service), then the environment's.
fn settings(env_file: Option<&Path>) -> Result<Config> {
    let file = match env_file {
        Some(path) => parse_env_file(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        ),
        None => HashMap::new(),
    };
    Config::from_lookup(|name| file.get(name).cloned().or_else(|| std::env::var(name).ok()))
}

/// `KEY=value` lines as systemd's `EnvironmentFile=` reads them: `#` and `;` start comments,
/// blanks around the key and value are dropped, and one pair of quotes around the value too.
/// (Line continuations and escapes inside quotes are not read: the file tenantd ships has none.)
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(key, value)| {
            let value = value.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
                .unwrap_or(value);
            (key.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

fn postgres_limits(config: &Config) -> Result<ServerLimits> {
    let db = DbSettings {
        url: config.database_url.as_str().into(),
        connect_timeout: config.connect_timeout,
        statement_timeout: config.statement_timeout,
        keepalive: config.db_keepalive,
    };
    let mut client = store::connect(&db, "tenantd check")?;
    store::limits::server_limits(&mut client).context("reading PostgreSQL's settings")
}

fn tenants(server: &ServerLimits) -> String {
    match server.active_tenants {
        Some(n) => format!(", {} active tenants", table::count(n.max(0) as u64)),
        None => ", no tenantd schema yet".into(),
    }
}

/// Whether the broker runs on this host, so that its memory per tenant counts here too.
fn broker_here(brokers: &Brokers) -> bool {
    brokers
        .addrs()
        .iter()
        .any(|a| rabbitmq::is_loopback(a.host()))
}

fn names(limits: &[&Limit]) -> String {
    let names: Vec<&str> = limits.iter().map(|l| l.what.as_str()).collect();
    names.join(" and ")
}

/// Limits below what the database already asks of one replica: warnings, never failures.
fn low_limits(
    server: Option<&ServerLimits>,
    tightest: Option<&(u64, Vec<&Limit>)>,
    config: &Config,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let Some(server) = server else {
        return warnings;
    };
    let active = server.active_tenants.unwrap_or(0).max(0) as u64;
    if let Some((fewest, bound)) = tightest.filter(|(fewest, _)| *fewest < active) {
        warnings.push(format!(
            "the database holds {} active tenants and one tenantd here can run about {}: run more \
             replicas, or raise {}",
            table::count(active),
            table::count(*fewest),
            names(bound)
        ));
    }
    let usable = server.max_connections - server.reserved_connections;
    let free = usable - server.connections_in_use;
    let need = rows::replica_connections(config);
    if free < need {
        warnings.push(format!(
            "PostgreSQL has {free} of {usable} connections free and a replica opens up to {need}"
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_env_file_is_read_as_systemd_reads_it() {
        let file = "# a comment\n; another\n\n  DATABASE_URL = postgres://db/x  \n\
                    API_TOKEN=\"quoted secret\"\nJWT_ISSUER='single'\nEMPTY=\n#HTTP_ADDR=0.0.0.0:1\n";
        let vars = parse_env_file(file);
        assert_eq!(vars["DATABASE_URL"], "postgres://db/x");
        assert_eq!(vars["API_TOKEN"], "quoted secret");
        assert_eq!(vars["JWT_ISSUER"], "single");
        assert_eq!(vars["EMPTY"], "");
        assert!(!vars.contains_key("HTTP_ADDR"));
        assert_eq!(vars.len(), 4);
    }

    #[test]
    fn arguments_are_an_env_file_or_help() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse(&args(&[])).unwrap(), Some(None));
        assert_eq!(parse(&args(&["--help"])).unwrap(), None);
        assert_eq!(
            parse(&args(&["--env-file", "/etc/tenantd/tenantd.env"])).unwrap(),
            Some(Some("/etc/tenantd/tenantd.env".into()))
        );
        assert!(parse(&args(&["--env-file"])).is_err());
        assert!(parse(&args(&["--verbose"])).is_err());
    }
}
