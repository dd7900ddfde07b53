//! End-to-end tests of the pipeline live in `tests/`; this crate has no code of its own.
