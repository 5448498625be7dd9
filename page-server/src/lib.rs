//! The destination side of ferry.
pub mod store;
