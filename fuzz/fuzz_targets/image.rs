//! Fuzz target: disk store metadata files and the restore checks of a decoded process tree; see
//! `ferry::fuzzing::image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzzing::image(data);
});
