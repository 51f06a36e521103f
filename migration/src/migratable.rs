//! What a device implements to travel in the stream (after Cloud
//! Hypervisor's `Snapshottable`, reduced to the part Ferry needs).
//!
//! A device's state is a serde value written as the JSON payload of one
//! `device` section named `SECTION` or `SECTION/instance`
//! (`serial/com1`, `virtio-net/net0`). A reader accepts versions 1 to
//! `VERSION`; additive changes to the state use `#[serde(default)]` and
//! need no new version.

use crate::{Section, SectionKind, StreamError, StreamWriter};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;

/// A device that saves its state to the stream and restores from it.
pub trait Migratable {
    /// Section name prefix, e.g. `virtio-net`.
    const SECTION: &'static str;
    /// Current version of `State`.
    const VERSION: u32;
    /// The saved state.
    type State: Serialize + DeserializeOwned;

    /// The instance id, if there can be several (`net0`, `com1`).
    fn instance(&self) -> Option<String> {
        None
    }

    /// The state to send. Called with the device quiesced.
    fn save(&self) -> Result<Self::State, MigratableError>;

    /// Takes over a saved state `version` (1 to `VERSION`).
    fn restore(&mut self, state: Self::State, version: u32) -> Result<(), MigratableError>;

    /// The section name: `SECTION` or `SECTION/instance`.
    fn section_name(&self) -> String {
        match self.instance() {
            Some(id) => format!("{}/{id}", Self::SECTION),
            None => Self::SECTION.to_owned(),
        }
    }
}

/// Why a device could not save or take a state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MigratableError(pub String);

impl MigratableError {
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

impl<W: Write> StreamWriter<W> {
    /// Writes `device`'s state as a `device` section.
    pub fn write_device<M: Migratable>(&mut self, device: &M) -> Result<(), StreamError> {
        let name = device.section_name();
        let state = device.save().map_err(|e| StreamError::Encode {
            section: name.clone(),
            offset: self.bytes_written(),
            why: e.0,
        })?;
        self.write_json(SectionKind::Device, &name, M::VERSION, &state)
    }
}

impl Section {
    /// Restores `device` from this section: checks kind, name and version,
    /// decodes the state and hands it over.
    pub fn restore_into<M: Migratable>(&self, device: &mut M) -> Result<(), StreamError> {
        let expected = device.section_name();
        if self.kind != SectionKind::Device || self.name != expected {
            return Err(StreamError::Refused {
                section: self.name.clone(),
                offset: self.offset,
                why: format!("expected device section {expected}"),
            });
        }
        self.check_version(M::VERSION)?;
        let state: M::State = self.json()?;
        device
            .restore(state, self.version)
            .map_err(|e| StreamError::Refused {
                section: self.name.clone(),
                offset: self.offset,
                why: e.0,
            })
    }
}
