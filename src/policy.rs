//! Round policy (being written).
