//! QMP, the QEMU Machine Protocol, as Ferry speaks it: a control socket
//! that existing QMP clients and libraries talk to unchanged.
//!
//! The pieces:
//! - [`QmpListener`] binds the socket named by a `--qmp` spec
//!   ([`QmpSocketSpec`], QEMU's spellings accepted);
//! - [`QmpServer`] is an event-manager subscriber: the listening socket and
//!   every connected client, non-blocking, on the VMM thread;
//! - commands are declared with a small schema ([`CommandSpec`],
//!   [`ArgSpec`], [`ArgType`]) so arguments are checked before a
//!   [`QmpHandler`] sees them, with QEMU's wording;
//! - [`EventEmitter`] queues asynchronous events from any thread;
//! - [`client::QmpClient`] is a small blocking client (`ferry ctl`, tests).
//!
//! docs/qmp.md describes the protocol as implemented here.

pub mod client;
mod error;
mod events;
mod framing;
#[doc(hidden)]
pub mod fuzzing;
mod json;
mod protocol;
mod schema;
mod server;
mod socket;

pub use error::{ErrorClass, QmpError, QmpSetupError};
pub use events::{EventEmitter, QmpEvent, Timestamp};
pub use protocol::{QmpHandler, QmpVersion};
pub use schema::{ArgSpec, ArgType, CommandSpec};
pub use server::{Limits, QmpServer};
pub use socket::{QmpListener, QmpSocketSpec, SocketSpecError};
