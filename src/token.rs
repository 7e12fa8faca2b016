//! `tenantd token`: mints a JWT from the configured HS256 secret, so an operator can hand a
//! tenant's backend a credential that reaches that tenant alone, without other tooling.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::http::auth::{self, Caller};
use crate::Config;

pub const USAGE: &str = "tenantd token (--tenant <id> | --admin) [--ttl <n>s|m|h|d]";

/// Prints a token for the caller the arguments name, signed with `JWT_HS256_SECRET` and
/// carrying `JWT_ISSUER` and `JWT_AUDIENCE` when set.
pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("Usage: {USAGE}\nPrints a JWT signed with JWT_HS256_SECRET, with JWT_ISSUER and JWT_AUDIENCE when set (ttl default 1h)");
        return Ok(());
    }
    let (caller, ttl) = parse(args)?;
    let config = Config::from_env()?;
    let token = auth::mint(&crate::auth_settings(&config), caller, ttl)?;
    println!("{token}");
    Ok(())
}

fn parse(args: &[String]) -> Result<(Caller, Duration)> {
    let mut caller = None;
    let mut ttl = Duration::from_secs(3600);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--tenant" => {
                let raw = value()?;
                let id = raw
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{raw:?} is not a tenant id (a UUID)"))?;
                name_once(&mut caller, Caller::Tenant(id))?;
            }
            "--admin" => name_once(&mut caller, Caller::Admin)?,
            "--ttl" => ttl = duration(value()?)?,
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    let caller = caller.with_context(|| format!("name whom the token is for; {USAGE}"))?;
    Ok((caller, ttl))
}

/// A token is for one caller: a second `--tenant` or `--admin` is refused, not taken over the
/// first.
fn name_once(caller: &mut Option<Caller>, named: Caller) -> Result<()> {
    if caller.is_some() {
        bail!("name one caller: --tenant <id> or --admin, once; {USAGE}");
    }
    *caller = Some(named);
    Ok(())
}

/// `90s`, `30m`, `1h`, `7d`, or plain seconds.
fn duration(raw: &str) -> Result<Duration> {
    let (number, unit) = match raw.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => raw.split_at(at),
        None => (raw, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && scale > 0 => Ok(Duration::from_secs(n * scale)),
        _ => bail!("--ttl {raw:?} is not a duration such as 90s, 30m, 1h or 7d"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        for bad in ["", "0s", "h", "1w", "-1h", "1.5h"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arguments_name_one_caller() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let id = "2a7a0324-8118-4e0a-9699-35c1ca694c2e";
        let (caller, ttl) = parse(&args(&["--tenant", id, "--ttl", "30m"])).unwrap();
        assert_eq!(caller, Caller::Tenant(id.parse().unwrap()));
        assert_eq!(ttl, Duration::from_secs(1800));
        assert_eq!(parse(&args(&["--admin"])).unwrap().0, Caller::Admin);
        assert!(parse(&args(&[])).is_err());
        assert!(parse(&args(&["--tenant", "nope"])).is_err());
        assert!(parse(&args(&["--tenant"])).is_err());
        for conflicting in [
            &["--admin", "--tenant", id][..],
            &["--tenant", id, "--admin"],
            &["--tenant", id, "--tenant", id],
        ] {
            let err = parse(&args(conflicting)).unwrap_err().to_string();
            assert!(err.contains("name one caller"), "{err}");
        }
    }
}
