//! A virtio-net control command as the guest's driver lays it out (class,
//! command, data), parsed as the device parses it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = devices::virtio::net::ctrl::parse(data);
});
