//! What the compose file and the scripts set up, read as they are (no Docker engine here): no
//! server published beyond this host, tenantd given a credential it accepts, and the broker's
//! `max_message_size` matching `MAX_MESSAGE_BYTES` wherever tenantd's side configures it.

use std::collections::HashMap;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn compose() -> Yaml {
    let text = include_str!("../../docker-compose.yml");
    YamlLoader::load_from_str(text)
        .expect("docker-compose.yml is YAML")
        .remove(0)
}

/// A service's environment, as written (before compose substitutes variables).
fn environment(service: &Yaml) -> HashMap<String, String> {
    let Some(map) = service["environment"].as_hash() else {
        return HashMap::new();
    };
    map.iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::Integer(n) => n.to_string(),
                other => other.as_str().expect("a string value").to_string(),
            };
            (k.as_str().unwrap().to_string(), value)
        })
        .collect()
}

/// `text` with compose's `${NAME:-default}` and `${NAME:?error}` replaced as compose would,
/// given `env` (the .env file): `Err(error)` when a required one is missing.
fn substitute(text: &str, env: &HashMap<&str, &str>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("a closing brace") + start;
        let inner = &rest[start + 2..end];
        let (name, fallback) = match inner.split_once(":-") {
            Some((name, default)) => (name, Ok(default.to_string())),
            None => match inner.split_once(":?") {
                Some((name, error)) => (name, Err(error.to_string())),
                None => (inner, Ok(String::new())),
            },
        };
        out.push_str(&env.get(name).map_or(fallback, |v| Ok(v.to_string()))?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[test]
fn compose_publishes_nothing_beyond_this_host_and_gives_tenantd_a_credential() {
    let doc = compose();
    let services = doc["services"].as_hash().expect("services");
    for (name, service) in services {
        for port in service["ports"].as_vec().into_iter().flatten() {
            let port = port.as_str().expect("ports as strings");
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name:?} publishes {port} beyond this host"
            );
        }
    }
    let tenantd = environment(&doc["services"]["tenantd"]);
    // Without a token in .env compose stops, saying where to put one.
    let no_env = HashMap::new();
    let error = substitute(&tenantd["API_TOKEN"], &no_env).unwrap_err();
    assert!(
        error.contains(".env") && error.contains("32+ bytes"),
        "{error}"
    );
    // With one, tenantd accepts every setting compose gives it (HTTP_ADDR 0.0.0.0 included).
    let token = "0123456789abcdef0123456789abcdef";
    let dotenv = HashMap::from([("API_TOKEN", token)]);
    let settings: HashMap<String, String> = tenantd
        .iter()
        .map(|(k, v)| (k.clone(), substitute(v, &dotenv).unwrap()))
        .collect();
    assert_eq!(settings["HTTP_ADDR"], "0.0.0.0:8080");
    let config = tenantd::Config::from_lookup(|n| settings.get(n).cloned())
        .expect("tenantd starts with compose's settings");
    assert_eq!(config.api_token.as_deref(), Some(token));
}

#[test]
fn compose_gives_its_broker_the_message_size_tenantd_stores() {
    let doc = compose();
    let tenantd = environment(&doc["services"]["tenantd"]);
    let broker = environment(&doc["services"]["rabbitmq"]);
    let args = &broker["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"];
    for dotenv in [
        HashMap::new(),
        HashMap::from([("MAX_MESSAGE_BYTES", "4096")]),
    ] {
        let stored = substitute(&tenantd["MAX_MESSAGE_BYTES"], &dotenv).unwrap();
        let accepted = substitute(args, &dotenv).unwrap();
        assert_eq!(accepted, format!("-rabbit max_message_size {stored}"));
        let config =
            tenantd::Config::from_lookup(|n| (n == "MAX_MESSAGE_BYTES").then(|| stored.clone()))
                .unwrap();
        assert_eq!(config.max_message_bytes.to_string(), stored);
    }
}

/// What `scripts/services.sh` would write to a broker's configuration file holding `current`.
fn broker_conf(current: Option<&str>, bytes: &str) -> String {
    let dir = std::env::temp_dir().join(format!("tenantd-conf-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let conf = dir.join("rabbitmq.conf");
    if let Some(text) = current {
        std::fs::write(&conf, text).unwrap();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#". "$0" && rabbitmq_conf_with_max_message_size "$1" "$2""#)
        .args([script, conf.to_str().unwrap(), bytes])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_scripts_give_a_broker_they_start_the_message_size_tenantd_stores() {
    assert_eq!(broker_conf(None, "1048576"), "max_message_size = 1048576\n");
    let current =
        "listeners.tcp.default = 5672\nmax_message_size = 134217728\nloopback_users = none\n";
    assert_eq!(
        broker_conf(Some(current), "2048"),
        "listeners.tcp.default = 5672\nloopback_users = none\nmax_message_size = 2048\n"
    );
    // Only where the scripts start the broker themselves: a running one is left alone.
    let services = include_str!("../../scripts/services.sh");
    let ensure = services
        .split("ensure_rabbitmq() {")
        .nth(1)
        .expect("ensure_rabbitmq");
    let (before_start, _) = ensure.split_once("rabbitmq-server -detached").unwrap();
    let returns_early = before_start.find(r#"port_open "$AMQP_PORT" && return 0"#);
    let configures = before_start.find("rabbitmq_conf_with_max_message_size");
    assert!(returns_early.is_some() && configures > returns_early);
    assert!(before_start.contains("${MAX_MESSAGE_BYTES:-1048576}"));
}
