//! Shared helpers for Ferry's integration tests and benchmarks: what the
//! host can do, the guests (probe and Linux), network namespaces, and
//! driving `ferry` and QEMU processes.

pub mod announce;
pub mod bench_net;
pub mod delayline;
pub mod ferry;
pub mod host;
pub mod hosts;
pub mod linux;
pub mod netns;
pub mod probe;
pub mod strangers;
pub mod stream;
pub mod switch;
pub mod tiny;
pub mod tlscerts;
pub mod udpstream;
pub mod virtio_driver;
pub mod vmms;
