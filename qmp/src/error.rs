//! QMP's error classes and the errors of setting a server up.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `class` of a QMP error reply. These are exactly QEMU's classes:
/// clients switch on them, so Ferry invents none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Everything without a more specific class (QEMU's default).
    GenericError,
    /// The command does not exist, or is not allowed in this mode.
    CommandNotFound,
    /// A device exists but is not in a state to do what was asked.
    DeviceNotActive,
    /// No device by that name.
    DeviceNotFound,
    /// The host's KVM lacks what the command needs.
    KVMMissingCap,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::GenericError,
        ErrorClass::CommandNotFound,
        ErrorClass::DeviceNotActive,
        ErrorClass::DeviceNotFound,
        ErrorClass::KVMMissingCap,
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }

    /// The class named `name` on the wire, if it is one of QEMU's.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QMP error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of nearly every QEMU error.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// QEMU's reply to a command it does not know.
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    pub fn kvm_missing_cap(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::KVMMissingCap, desc)
    }
}

/// What can go wrong before the first client connects.
#[derive(Debug, thiserror::Error)]
pub enum QmpSetupError {
    #[error("QMP socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {path} is in use by another process")]
    InUse { path: PathBuf },
    #[error("QMP socket {path}: the path exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("QMP command {0:?} is declared twice")]
    DuplicateCommand(String),
    #[error("QMP command {command:?} declares argument {arg:?} twice")]
    DuplicateArgument { command: String, arg: String },
    #[error("QMP event queue: {0}")]
    EventFd(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_trip_by_name() {
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::from_name(class.as_str()), Some(class));
            let json = serde_json::to_value(class).unwrap();
            assert_eq!(json, serde_json::Value::String(class.as_str().into()));
        }
        assert_eq!(ErrorClass::from_name("NoSuchClass"), None);
    }

    #[test]
    fn display_is_class_then_desc() {
        let e = QmpError::command_not_found("frobnicate");
        assert_eq!(
            e.to_string(),
            "CommandNotFound: The command frobnicate has not been found"
        );
    }
}
