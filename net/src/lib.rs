//! The host side of the guest's network: the TAP backend, MAC addresses,
//! and the `Nic` trait through which every NIC model tells the host which
//! addresses it answers to (and, with issue #7, announces them).

pub mod announce;
pub mod backend;
pub mod mac;
pub mod nic;
pub mod rarp;
pub mod senders;
pub mod tap;
pub mod unix;

pub use announce::AnnounceParams;
pub use backend::{MemBackend, NetBackend};
pub use mac::MacAddr;
pub use nic::Nic;
pub use senders::{rarp_plan, Identity, Senders};
pub use tap::{Tap, TapError};
