//! Declared commands and generic argument checking.
//!
//! Every command names its arguments and their types, so the server can
//! reject bad input before a handler runs, with QEMU's wording (clients
//! and people have seen these messages before), and can answer
//! `query-commands` from the same table.

use serde_json::{Map, Value};

use super::error::{QmpError, QmpSetupError};

/// The JSON type an argument must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    String,
    /// A JSON number without fraction or exponent that fits in an `i64`
    /// or a `u64` (QAPI's `int` and `uint64`).
    Int,
    /// Any JSON number.
    Number,
    Bool,
    Object,
    Array,
    /// Anything, `null` included; the handler checks it.
    Any,
}

impl ArgType {
    /// The name QEMU puts after "expected:".
    pub fn qapi_name(self) -> &'static str {
        match self {
            ArgType::String => "string",
            ArgType::Int => "integer",
            ArgType::Number => "number",
            ArgType::Bool => "boolean",
            ArgType::Object => "object",
            ArgType::Array => "array",
            ArgType::Any => "any",
        }
    }

    pub fn accepts(self, value: &Value) -> bool {
        match self {
            ArgType::String => value.is_string(),
            ArgType::Int => value.is_i64() || value.is_u64(),
            ArgType::Number => value.is_number(),
            ArgType::Bool => value.is_boolean(),
            ArgType::Object => value.is_object(),
            ArgType::Array => value.is_array(),
            ArgType::Any => true,
        }
    }
}

/// One argument of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    pub name: &'static str,
    pub ty: ArgType,
    pub required: bool,
}

impl ArgSpec {
    pub const fn required(name: &'static str, ty: ArgType) -> Self {
        Self {
            name,
            ty,
            required: true,
        }
    }

    pub const fn optional(name: &'static str, ty: ArgType) -> Self {
        Self {
            name,
            ty,
            required: false,
        }
    }
}

/// A command the server accepts: its name and every argument it takes.
/// Arguments not listed are rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    pub name: &'static str,
    pub args: &'static [ArgSpec],
}

impl CommandSpec {
    pub const fn new(name: &'static str, args: &'static [ArgSpec]) -> Self {
        Self { name, args }
    }

    /// A command without arguments.
    pub const fn no_args(name: &'static str) -> Self {
        Self { name, args: &[] }
    }

    /// Checks `args` against the declaration, in QEMU's order: declared
    /// arguments first (missing, then mistyped), then anything extra.
    pub fn check_arguments(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        for spec in self.args {
            match args.get(spec.name) {
                None if spec.required => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' is missing",
                        spec.name
                    )))
                }
                None => {}
                Some(value) if !spec.ty.accepts(value) => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for '{}', expected: {}",
                        spec.name,
                        spec.ty.qapi_name()
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = args
            .keys()
            .find(|key| !self.args.iter().any(|spec| spec.name == key.as_str()))
        {
            return Err(QmpError::generic(format!(
                "Parameter '{extra}' is unexpected"
            )));
        }
        Ok(())
    }
}

/// Every command of one server, built-ins first, in declaration order
/// (which is the order `query-commands` lists them in).
#[derive(Debug)]
pub(crate) struct Registry {
    commands: Vec<CommandSpec>,
}

impl Registry {
    pub fn new(builtins: &[CommandSpec], commands: &[CommandSpec]) -> Result<Self, QmpSetupError> {
        let mut all: Vec<CommandSpec> = Vec::with_capacity(builtins.len() + commands.len());
        for spec in builtins.iter().chain(commands) {
            if all.iter().any(|c| c.name == spec.name) {
                return Err(QmpSetupError::DuplicateCommand(spec.name.to_string()));
            }
            for (i, arg) in spec.args.iter().enumerate() {
                if spec.args[..i].iter().any(|a| a.name == arg.name) {
                    return Err(QmpSetupError::DuplicateArgument {
                        command: spec.name.to_string(),
                        arg: arg.name.to_string(),
                    });
                }
            }
            all.push(*spec);
        }
        Ok(Self { commands: all })
    }

    pub fn get(&self, name: &str) -> Option<&CommandSpec> {
        self.commands.iter().find(|c| c.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &CommandSpec> {
        self.commands.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;
    use serde_json::json;

    const MIGRATE: CommandSpec = CommandSpec::new(
        "migrate",
        &[
            ArgSpec::required("uri", ArgType::String),
            ArgSpec::optional("detach", ArgType::Bool),
            ArgSpec::optional("limit", ArgType::Int),
            ArgSpec::optional("ratio", ArgType::Number),
            ArgSpec::optional("opts", ArgType::Object),
            ArgSpec::optional("list", ArgType::Array),
            ArgSpec::optional("blob", ArgType::Any),
        ],
    );

    fn check(args: Value) -> Result<(), QmpError> {
        let Value::Object(map) = args else {
            unreachable!("tests pass objects")
        };
        MIGRATE.check_arguments(&map)
    }

    fn desc(args: Value) -> String {
        let e = check(args).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError);
        e.desc
    }

    #[test]
    fn well_typed_arguments_pass() {
        check(json!({"uri": "tcp:1:2"})).unwrap();
        check(json!({
            "uri": "x", "detach": true, "limit": -3, "ratio": 0.5,
            "opts": {}, "list": [1], "blob": null
        }))
        .unwrap();
        check(json!({"uri": "x", "limit": u64::MAX, "ratio": 7})).unwrap();
    }

    #[test]
    fn missing_required() {
        assert_eq!(desc(json!({})), "Parameter 'uri' is missing");
        assert_eq!(desc(json!({"detach": true})), "Parameter 'uri' is missing");
    }

    #[test]
    fn unexpected() {
        assert_eq!(
            desc(json!({"uri": "x", "bogus": 1})),
            "Parameter 'bogus' is unexpected"
        );
    }

    #[test]
    fn wrong_types_use_qapi_names() {
        let cases = [
            (json!({"uri": 1}), "uri", "string"),
            (json!({"uri": "x", "detach": "yes"}), "detach", "boolean"),
            (json!({"uri": "x", "limit": 1.5}), "limit", "integer"),
            (json!({"uri": "x", "limit": "1"}), "limit", "integer"),
            (json!({"uri": "x", "ratio": "1"}), "ratio", "number"),
            (json!({"uri": "x", "opts": []}), "opts", "object"),
            (json!({"uri": "x", "list": {}}), "list", "array"),
            (json!({"uri": null}), "uri", "string"),
        ];
        for (args, name, ty) in cases {
            assert_eq!(
                desc(args),
                format!("Invalid parameter type for '{name}', expected: {ty}")
            );
        }
    }

    #[test]
    fn declared_arguments_are_checked_before_extras() {
        assert_eq!(
            desc(json!({"zzz": 1})),
            "Parameter 'uri' is missing",
            "QEMU reports a missing member before an unexpected one"
        );
    }

    #[test]
    fn registry_refuses_duplicates() {
        let a = CommandSpec::no_args("a");
        assert!(matches!(
            Registry::new(&[a], &[a]),
            Err(QmpSetupError::DuplicateCommand(n)) if n == "a"
        ));
        const TWICE: CommandSpec = CommandSpec::new(
            "t",
            &[
                ArgSpec::required("x", ArgType::Int),
                ArgSpec::optional("x", ArgType::Int),
            ],
        );
        assert!(matches!(
            Registry::new(&[], &[TWICE]),
            Err(QmpSetupError::DuplicateArgument { .. })
        ));
        let r = Registry::new(&[a], &[MIGRATE]).unwrap();
        let names: Vec<_> = r.iter().map(|c| c.name).collect();
        assert_eq!(names, ["a", "migrate"]);
        assert!(r.get("migrate").is_some());
        assert!(r.get("b").is_none());
    }
}
