//! Fuzz target: page-batch validation and decompression of a hostile data frame
//! (proto/src/batch.rs); see `ferry::fuzzing::batch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzzing::batch(data);
});
