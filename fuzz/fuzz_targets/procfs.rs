//! Fuzz target: every pure /proc parser (src/procfs.rs); see `ferry::fuzzing::procfs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry::fuzzing::procfs(data);
});
