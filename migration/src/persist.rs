//! The saved-state seam: what every device with state implements to
//! travel in the stream (after Firecracker's `Persist` and Cloud
//! Hypervisor's `Snapshottable`, reduced to one object-safe trait so the
//! VMM can keep its devices in one list and loop over it).
//!
//! A device's state is a plain serde struct in the device's `persist.rs`,
//! written as the JSON payload of one `device` section named
//! `KIND` or `KIND/instance` (`serial/com1`, `virtio-net/net0`). A reader
//! accepts versions 1 to [`SavedState::section_version`]; additive
//! changes to a state use `#[serde(default)]` and need no new version.

use std::io::Write;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Section, SectionKind, StreamError, StreamWriter};

/// A device whose state is saved into one section and restored from it.
pub trait SavedState: Send {
    /// The section's name: `serial/com1`, `virtio-net/net0`.
    fn section_name(&self) -> String;
    /// The state version this build writes; it reads 1 to this.
    fn section_version(&self) -> u32;
    /// Whether a stream without this section still loads: state added
    /// after streams without it were written (the device keeps its
    /// power-on state).
    fn optional(&self) -> bool {
        false
    }
    /// The section's payload. Called with the VM paused.
    fn save_state(&self) -> Result<Vec<u8>, SavedStateError>;
    /// Takes over a payload written by version `version` (already checked
    /// to be 1 to [`Self::section_version`]).
    fn restore_state(&mut self, version: u32, payload: &[u8]) -> Result<(), SavedStateError>;
}

/// Why a device could not save or take a state.
#[derive(Debug, thiserror::Error)]
pub enum SavedStateError {
    #[error("does not encode: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("does not decode: {0}")]
    Decode(#[source] serde_json::Error),
    /// The state decodes but the device cannot take it (a queue outside
    /// guest memory, a register the model refuses).
    #[error("refused: {0}")]
    Refused(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SavedStateError {
    pub fn refused(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Refused(Box::new(e))
    }
}

/// A state as a section payload (JSON).
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SavedStateError> {
    serde_json::to_vec(state).map_err(SavedStateError::Encode)
}

/// A section payload as a state.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, SavedStateError> {
    serde_json::from_slice(payload).map_err(SavedStateError::Decode)
}

impl<W: Write> StreamWriter<W> {
    /// Writes `device`'s state as a `device` section.
    pub fn write_state(&mut self, device: &dyn SavedState) -> Result<(), StreamError> {
        let name = device.section_name();
        let payload = device
            .save_state()
            .map_err(|source| StreamError::DeviceState {
                section: name.clone(),
                offset: self.bytes_written(),
                source,
            })?;
        self.write_section(
            SectionKind::Device,
            &name,
            device.section_version(),
            &payload,
        )
    }
}

impl Section {
    /// Restores `device` from this section: checks kind, name and
    /// version, then hands the payload over.
    pub fn restore_into(&self, device: &mut dyn SavedState) -> Result<(), StreamError> {
        let expected = device.section_name();
        if self.kind != SectionKind::Device || self.name != expected {
            return Err(StreamError::WrongSection {
                section: self.name.clone(),
                offset: self.offset,
                expected,
            });
        }
        self.check_version(device.section_version())?;
        device
            .restore_state(self.version, &self.payload)
            .map_err(|source| StreamError::DeviceState {
                section: self.name.clone(),
                offset: self.offset,
                source,
            })
    }
}
