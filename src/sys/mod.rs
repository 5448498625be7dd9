//! Raw syscalls (being written).
