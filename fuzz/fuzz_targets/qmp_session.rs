//! One QMP client's bytes through the server's framing and dispatch (the
//! greeting's negotiation, argument checks of every type, replies), cut
//! into pieces at the sizes the input's first byte gives.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((cut, rest)) = data.split_first() {
        qmp::fuzzing::session(rest, usize::from(*cut).max(1));
    }
});
