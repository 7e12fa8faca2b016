//! Tokens as an identity provider would issue them (HS256 with a shared secret, RS256 and ES256
//! with key pairs `openssl` makes for the test), forgeries, and requests that carry them.

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::http::{request_with, Reply};

/// The HS256 secret of the tests (at least 32 bytes, as tenantd requires).
pub const SECRET: &str = "tenantd tests: a shared HS256 secret of 32+ bytes";

pub fn now() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    since.as_secs() as i64
}

/// The claims of an admin's token, valid for an hour.
pub fn admin() -> Value {
    json!({ "role": "admin", "iat": now(), "exp": now() + 3600 })
}

/// The claims of a token for `tenant`, valid for an hour.
pub fn tenant(tenant: &str) -> Value {
    json!({ "role": "tenant", "tenant_id": tenant, "iat": now(), "exp": now() + 3600 })
}

/// `claims` with `changes` applied (a `null` removes the claim).
pub fn with(mut claims: Value, changes: Value) -> Value {
    for (name, value) in changes.as_object().unwrap() {
        match value {
            Value::Null => claims.as_object_mut().unwrap().remove(name),
            v => claims
                .as_object_mut()
                .unwrap()
                .insert(name.clone(), v.clone()),
        };
    }
    claims
}

pub fn hs256(secret: &[u8], claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
}

/// A token whose header says `alg: none`, with no signature.
pub fn unsigned(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}.", b64url(claims.to_string().as_bytes()))
}

fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// A key pair made by `openssl` in a directory of its own, removed with it.
pub struct KeyPair {
    dir: PathBuf,
    algorithm: Algorithm,
    pub private_pem: Vec<u8>,
    pub public_pem: Vec<u8>,
}

impl KeyPair {
    /// A 2048-bit RSA key, for RS256.
    pub fn rsa() -> KeyPair {
        KeyPair::generate(
            Algorithm::RS256,
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        )
    }

    /// A P-256 key, for ES256.
    pub fn p256() -> KeyPair {
        KeyPair::generate(
            Algorithm::ES256,
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        )
    }

    /// A P-384 key: an EC key tenantd does not take.
    pub fn p384() -> KeyPair {
        KeyPair::generate(
            Algorithm::ES384,
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
        )
    }

    fn generate(algorithm: Algorithm, options: &[&str]) -> KeyPair {
        let dir =
            std::env::temp_dir().join(format!("tenantd-keys-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let private = dir.join("private.pem");
        let public = dir.join("public.pem");
        openssl(&[&["genpkey"], options, &["-out", private.to_str().unwrap()]].concat());
        openssl(&[
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        KeyPair {
            algorithm,
            private_pem: std::fs::read(&private).unwrap(),
            public_pem: std::fs::read(&public).unwrap(),
            dir,
        }
    }

    /// The PEM file of the public key, for `JWT_PUBLIC_KEY_FILE`.
    pub fn public_file(&self) -> PathBuf {
        self.dir.join("public.pem")
    }

    /// The PEM file of the private key (which tenantd must refuse as a verification key).
    pub fn private_file(&self) -> PathBuf {
        self.dir.join("private.pem")
    }

    pub fn sign(&self, claims: &Value) -> String {
        let key = match self.algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&self.private_pem),
            _ => EncodingKey::from_ec_pem(&self.private_pem),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), claims, &key.unwrap()).unwrap()
    }
}

impl Drop for KeyPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A request with `Authorization: Bearer <token>` when a token is given, and a JSON body.
pub fn call(
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("Authorization", bearer));
    }
    request_with(base, method, path, &headers, body.map(str::as_bytes))
}

impl Reply {
    /// Asserts a 401 for a token that does not verify: the JSON error names `why`, and the
    /// challenge says `invalid_token`.
    pub fn assert_invalid_token(&self, why: &str) {
        self.assert_error(401, why);
        let challenge = self.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with(r#"Bearer error="invalid_token""#),
            "{challenge:?}"
        );
    }

    /// Asserts a 403: a valid token that does not reach this route.
    pub fn assert_forbidden(&self) {
        self.assert_error(403, "");
        let challenge = self.header("www-authenticate");
        assert_eq!(challenge, Some(r#"Bearer error="insufficient_scope""#));
    }
}
