//! Fuzz target: the destination's session state machine fed a transcript of frames
//! (proto/src/session.rs); see `ferry::fuzzing::session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzzing::session(data);
});
