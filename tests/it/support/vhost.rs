//! A RabbitMQ vhost of the test's own, for limits that must not touch other tests: created with
//! `rabbitmqctl` (or the management API when `TENANTD_TEST_RABBITMQ_API` names one, as in the
//! Docker stack), deleted with everything in it when the test ends.

use std::process::Command;

pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn create() -> Vhost {
        let name = format!("tenantd_it_{}", uuid::Uuid::new_v4().simple());
        match api() {
            Some(api) => {
                management(&api, "PUT", &format!("/api/vhosts/{name}"), "{}");
                let perms = r#"{"configure":".*","write":".*","read":".*"}"#;
                management(
                    &api,
                    "PUT",
                    &format!("/api/permissions/{name}/guest"),
                    perms,
                );
            }
            None => {
                rabbitmqctl(&["add_vhost", &name]);
                rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
            }
        }
        Vhost { name }
    }

    /// The broker URL of this vhost.
    pub fn url(&self) -> String {
        let base = super::rabbitmq_url();
        let root = base.rsplit_once('/').map_or(base.as_str(), |(r, _)| r);
        format!("{root}/{}", self.name)
    }

    /// Allows at most `n` connections in the vhost at once.
    pub fn limit_connections(&self, n: u32) {
        let limits = format!(r#"{{"max-connections": {n}}}"#);
        match api() {
            Some(api) => {
                let body = format!(r#"{{"value": {n}}}"#);
                management(
                    &api,
                    "PUT",
                    &format!("/api/vhost-limits/{}/max-connections", self.name),
                    &body,
                );
            }
            None => {
                rabbitmqctl(&["set_vhost_limits", "-p", &self.name, &limits]);
            }
        }
    }

    /// Applies a policy to the vhost's queues whose names match `pattern`.
    pub fn set_policy(&self, name: &str, pattern: &str, definition: &str) {
        match api() {
            Some(api) => {
                let body = format!(
                    r#"{{"pattern":"{pattern}","definition":{definition},"apply-to":"queues"}}"#
                );
                management(
                    &api,
                    "PUT",
                    &format!("/api/policies/{}/{name}", self.name),
                    &body,
                );
            }
            None => {
                let args = ["set_policy", "-p", &self.name, name, pattern, definition];
                rabbitmqctl(&[&args[..], &["--apply-to", "queues"]].concat());
            }
        }
    }

    /// The queue's type (`classic`, `quorum`) as the broker reports it.
    pub fn queue_type(&self, queue: &str) -> String {
        match api() {
            Some(api) => {
                let path = format!("/api/queues/{}/{queue}", self.name);
                let reply = super::http::request_with(&api, "GET", &path, &[AUTH], None);
                reply.json()["type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            }
            None => {
                let out = rabbitmqctl(&["list_queues", "-p", &self.name, "name", "type"]);
                out.lines()
                    .filter_map(|l| l.split_once('\t'))
                    .find(|(name, _)| *name == queue)
                    .map(|(_, kind)| kind.trim().to_string())
                    .unwrap_or_default()
            }
        }
    }

    /// A broker user with these permissions (regular expressions) in this vhost only, as an
    /// operator gives one to a tenant's publishers; deleted when dropped.
    pub fn add_user(&self, user: &str, password: &str, perms: [&str; 3]) -> BrokerUser {
        let [configure, write, read] = perms;
        match api() {
            Some(api) => {
                let body = format!(r#"{{"password":"{password}","tags":""}}"#);
                management(&api, "PUT", &format!("/api/users/{user}"), &body);
                let perms =
                    serde_json::json!({ "configure": configure, "write": write, "read": read });
                let path = format!("/api/permissions/{}/{user}", self.name);
                management(&api, "PUT", &path, &perms.to_string());
            }
            None => {
                rabbitmqctl(&["add_user", user, password]);
                rabbitmqctl(&[
                    "set_permissions",
                    "-p",
                    &self.name,
                    user,
                    configure,
                    write,
                    read,
                ]);
            }
        }
        let base = self.url();
        let (scheme, rest) = base.split_once("://").unwrap();
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        BrokerUser {
            name: user.to_string(),
            url: format!("{scheme}://{user}:{password}@{host}"),
        }
    }

    pub fn clear_limits(&self) {
        match api() {
            Some(api) => management(
                &api,
                "DELETE",
                &format!("/api/vhost-limits/{}/max-connections", self.name),
                "",
            ),
            None => {
                rabbitmqctl(&["clear_vhost_limits", "-p", &self.name]);
            }
        }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        match api() {
            Some(api) => management(&api, "DELETE", &format!("/api/vhosts/{}", self.name), ""),
            None => {
                rabbitmqctl(&["delete_vhost", &self.name]);
            }
        }
    }
}

/// A broker user of a test's own.
pub struct BrokerUser {
    pub name: String,
    /// The broker URL (with this vhost) that logs in as this user.
    pub url: String,
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        match api() {
            Some(api) => management(&api, "DELETE", &format!("/api/users/{}", self.name), ""),
            None => {
                rabbitmqctl(&["delete_user", &self.name]);
            }
        }
    }
}

/// The arguments a queue of the default vhost was declared with, as the broker reports them.
pub fn queue_arguments(queue: &str) -> String {
    match api() {
        Some(api) => {
            let path = format!("/api/queues/%2f/{queue}");
            let reply = super::http::request_with(&api, "GET", &path, &[AUTH], None);
            reply.json()["arguments"].to_string()
        }
        None => rabbitmqctl(&["list_queues", "name", "arguments"])
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, arguments)| arguments.to_string())
            .unwrap_or_default(),
    }
}

fn api() -> Option<String> {
    std::env::var("TENANTD_TEST_RABBITMQ_API").ok()
}

const AUTH: (&str, &str) = ("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=");

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl (or set TENANTD_TEST_RABBITMQ_API to the management API)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A request to the management API with guest's credentials.
fn management(api: &str, method: &str, path: &str, body: &str) {
    let reply = super::http::request_with(
        api,
        method,
        path,
        &[AUTH, ("Content-Type", "application/json")],
        Some(body.as_bytes()),
    );
    assert!(reply.status < 300, "{method} {path}: {}", reply.text());
}
