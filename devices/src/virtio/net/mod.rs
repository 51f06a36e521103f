//! virtio-net: the model (`device.rs`), its wiring to the event loop
//! (`event_handler.rs`), its saved state (`persist.rs`), and the control
//! queue's commands and receive filter.

pub mod ctrl;
pub mod device;
pub mod event_handler;
pub mod filter;
pub mod forward;
pub mod persist;

pub use device::{Net, NetMetrics, NetOptions, RxFilterNotify};
pub use event_handler::NetEventHandler;
pub use persist::{NetSnapshot, NetState};
