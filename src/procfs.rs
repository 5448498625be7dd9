//! /proc introspection (being written).
