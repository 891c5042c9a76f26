//! Storage conformance suite.
