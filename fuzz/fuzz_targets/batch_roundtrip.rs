//! Fuzz target: page ranges through the batch encoder, the framing and the decoder; see
//! `ferry::fuzzing::batch_roundtrip`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzzing::batch_roundtrip(data);
});
