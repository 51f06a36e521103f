//! User-created objects (`object-add`, `object-del`, `--object`): the
//! TLS credentials and authorization lists an orchestrator configures
//! before a migration, with QEMU's types, properties and errors. The
//! "Trust" work uses them; here they are checked and kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::qmp::{ArgSpec, ArgType, CommandSpec, QmpError};

/// Which side of a TLS connection credentials are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Server,
    Client,
}

/// One object, as added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserObject {
    /// `tls-creds-x509`: a directory of PEM files with QEMU's names.
    TlsCredsX509 {
        dir: PathBuf,
        endpoint: Endpoint,
        verify_peer: bool,
    },
    /// `authz-simple`: the one client identity (certificate DN) allowed.
    AuthzSimple { identity: String },
}

/// Every property of every type, for the command's schema; each type
/// then refuses the ones that are not its own.
const PROPERTIES: &[(&str, &str, ArgType)] = &[
    ("tls-creds-x509", "dir", ArgType::String),
    ("tls-creds-x509", "endpoint", ArgType::String),
    ("tls-creds-x509", "verify-peer", ArgType::Bool),
    ("tls-creds-x509", "sanity-check", ArgType::Bool),
    ("tls-creds-x509", "priority", ArgType::String),
    ("authz-simple", "identity", ArgType::String),
];

pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec::new(
        "object-add",
        &[
            ArgSpec::required("qom-type", ArgType::String),
            ArgSpec::required("id", ArgType::String),
            ArgSpec::optional("dir", ArgType::String),
            ArgSpec::optional("endpoint", ArgType::String),
            ArgSpec::optional("verify-peer", ArgType::Bool),
            ArgSpec::optional("sanity-check", ArgType::Bool),
            ArgSpec::optional("priority", ArgType::String),
            ArgSpec::optional("identity", ArgType::String),
        ],
    ),
    CommandSpec::new("object-del", &[ArgSpec::required("id", ArgType::String)]),
];

/// The objects by id.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    by_id: BTreeMap<String, UserObject>,
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.`, `_`.
fn is_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

fn check_readable(dir: &Path, file: &str) -> Result<(), QmpError> {
    let path = dir.join(file);
    std::fs::metadata(&path).map(|_| ()).map_err(|e| {
        let why = e.raw_os_error().map_or_else(
            || e.to_string(),
            |n| std::io::Error::from_raw_os_error(n).to_string(),
        );
        // std adds " (os error N)"; QEMU prints strerror alone.
        let why = why.split(" (os error").next().unwrap_or(&why).to_string();
        QmpError::generic(format!(
            "Unable to access credentials {}: {why}",
            path.display()
        ))
    })
}

impl Objects {
    pub fn get(&self, id: &str) -> Option<&UserObject> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// `object-add`: the arguments checked as QEMU checks them.
    pub fn add(&mut self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let text = |k: &str| args.get(k).and_then(Value::as_str);
        let qom_type = text("qom-type").unwrap_or("");
        let id = text("id").unwrap_or("");
        if !PROPERTIES.iter().any(|p| p.0 == qom_type) {
            return Err(QmpError::generic(format!(
                "Parameter 'qom-type' does not accept value '{qom_type}'"
            )));
        }
        if let Some(extra) = args.keys().find(|k| {
            !matches!(k.as_str(), "qom-type" | "id")
                && !PROPERTIES
                    .iter()
                    .any(|p| p.0 == qom_type && p.1 == k.as_str())
        }) {
            return Err(QmpError::generic(format!(
                "Parameter '{extra}' is unexpected"
            )));
        }
        if !is_identifier(id) {
            return Err(QmpError::generic("Parameter 'id' expects an identifier"));
        }
        if self.by_id.contains_key(id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let object = match qom_type {
            "tls-creds-x509" => {
                let endpoint = match text("endpoint").unwrap_or("client") {
                    "server" => Endpoint::Server,
                    "client" => Endpoint::Client,
                    other => {
                        return Err(QmpError::generic(format!(
                            "Parameter 'endpoint' does not accept value '{other}'"
                        )))
                    }
                };
                let dir = PathBuf::from(text("dir").unwrap_or(""));
                // QEMU loads the files as the object is made: a missing
                // one is an error now, not at the migration.
                check_readable(&dir, "ca-cert.pem")?;
                if endpoint == Endpoint::Server {
                    check_readable(&dir, "server-cert.pem")?;
                    check_readable(&dir, "server-key.pem")?;
                }
                UserObject::TlsCredsX509 {
                    dir,
                    endpoint,
                    verify_peer: args
                        .get("verify-peer")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                }
            }
            _ => UserObject::AuthzSimple {
                identity: text("identity").unwrap_or("").to_string(),
            },
        };
        self.by_id.insert(id.to_string(), object);
        Ok(())
    }

    /// `--object TYPE,id=ID,key=value,...` (QEMU's `-object`): the same
    /// object as `object-add` makes, from QEMU's key=value syntax (`,,`
    /// is a literal comma; booleans are on/off, yes/no or true/false).
    /// Errors name the option as QEMU's do.
    pub fn add_from_cli(&mut self, spec: &str) -> Result<(), String> {
        let named = |e: String| format!("--object {spec}: {e}");
        let args = parse_keyval(spec).map_err(named)?;
        self.add(&args).map_err(|e| named(e.desc))
    }

    /// `object-del`.
    pub fn remove(&mut self, id: &str) -> Result<(), QmpError> {
        self.by_id
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| QmpError::generic(format!("object '{id}' not found")))
    }

    /// The object commands; `None`: not one of them.
    pub fn execute(
        &mut self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        let done = |r: Result<(), QmpError>| r.map(|()| Value::Object(Map::new()));
        match command {
            "object-add" => Some(done(self.add(args))),
            "object-del" => Some(done(
                self.remove(args.get("id").and_then(Value::as_str).unwrap_or("")),
            )),
            _ => None,
        }
    }
}

/// QEMU's key=value list as `object-add`'s arguments: a first element
/// without `=` is the type; values are typed by [`PROPERTIES`].
fn parse_keyval(spec: &str) -> Result<Map<String, Value>, String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    let mut args = Map::new();
    for (i, item) in items.into_iter().enumerate() {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 => ("qom-type".to_string(), item),
            None => return Err(format!("Expected '=' after parameter '{item}'")),
        };
        let known =
            matches!(key.as_str(), "qom-type" | "id") || PROPERTIES.iter().any(|p| p.1 == key);
        if !known {
            return Err(format!("Invalid parameter '{key}'"));
        }
        let is_bool = PROPERTIES
            .iter()
            .any(|p| p.1 == key && p.2 == ArgType::Bool);
        let value = if is_bool {
            match value.as_str() {
                "on" | "yes" | "true" => Value::Bool(true),
                "off" | "no" | "false" => Value::Bool(false),
                _ => return Err(format!("Parameter '{key}' expects 'on' or 'off'")),
            }
        } else {
            Value::String(value)
        };
        args.insert(key, value);
    }
    if !args.contains_key("qom-type") {
        return Err("Parameter 'qom-type' is missing".into());
    }
    if !args.contains_key("id") {
        return Err("Parameter 'id' is missing".into());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn objects_are_checked_with_qemus_words() {
        let dir = std::env::temp_dir().join(format!("ferry-objects-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut o = Objects::default();
        let tls = format!(
            r#"{{"qom-type": "tls-creds-x509", "id": "tls0", "dir": "{}", "endpoint": "server"}}"#,
            dir.display()
        );
        let e = o.add(&args(&tls)).unwrap_err();
        assert_eq!(
            e.desc,
            format!(
                "Unable to access credentials {}/ca-cert.pem: No such file or directory",
                dir.display()
            )
        );
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::write(dir.join(f), "pem").unwrap();
        }
        o.add(&args(&tls)).unwrap();
        assert!(matches!(
            o.get("tls0"),
            Some(UserObject::TlsCredsX509 {
                endpoint: Endpoint::Server,
                verify_peer: true,
                ..
            })
        ));
        let e = o.add(&args(&tls)).unwrap_err();
        assert_eq!(
            e.desc,
            "attempt to add duplicate property 'tls0' to object (type 'container')"
        );
        let cases = [
            (
                r#"{"qom-type": "frob", "id": "f"}"#,
                "Parameter 'qom-type' does not accept value 'frob'",
            ),
            (
                r#"{"qom-type": "authz-simple", "id": "a", "dir": "/"}"#,
                "Parameter 'dir' is unexpected",
            ),
            (
                r#"{"qom-type": "authz-simple", "id": "1a", "identity": "CN=x"}"#,
                "Parameter 'id' expects an identifier",
            ),
            (
                r#"{"qom-type": "tls-creds-x509", "id": "t", "endpoint": "sideways"}"#,
                "Parameter 'endpoint' does not accept value 'sideways'",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(o.add(&args(input)).unwrap_err().desc, want, "{input}");
        }
        o.add(&args(
            r#"{"qom-type": "authz-simple", "id": "auth0", "identity": "CN=src"}"#,
        ))
        .unwrap();
        assert_eq!(o.len(), 2);
        o.remove("auth0").unwrap();
        assert_eq!(
            o.remove("auth0").unwrap_err().desc,
            "object 'auth0' not found"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn command_line_objects_use_qemus_syntax_and_words() {
        let dir = std::env::temp_dir().join(format!("ferry-cli-obj-{}", std::process::id()));
        let odd = dir.join("a,b");
        std::fs::create_dir_all(&odd).unwrap();
        std::fs::write(odd.join("ca-cert.pem"), "pem").unwrap();
        let mut o = Objects::default();
        let spec = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client,verify-peer=off",
            odd.display().to_string().replace(',', ",,")
        );
        o.add_from_cli(&spec).unwrap();
        assert_eq!(
            o.get("tls0"),
            Some(&UserObject::TlsCredsX509 {
                dir: odd.clone(),
                endpoint: Endpoint::Client,
                verify_peer: false,
            })
        );
        for (spec, want) in [
            (
                "frob,id=t",
                "Parameter 'qom-type' does not accept value 'frob'",
            ),
            ("tls-creds-x509,dir=/x", "Parameter 'id' is missing"),
            ("tls-creds-x509,id=t,bogus=1", "Invalid parameter 'bogus'"),
            (
                "tls-creds-x509,id=t,verify-peer=1",
                "Parameter 'verify-peer' expects 'on' or 'off'",
            ),
        ] {
            assert_eq!(
                o.add_from_cli(spec).unwrap_err(),
                format!("--object {spec}: {want}")
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
