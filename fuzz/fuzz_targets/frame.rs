//! Fuzz target: control and data stream framing (proto/src/frame.rs); see `ferry::fuzzing::frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzzing::frame(data);
});
