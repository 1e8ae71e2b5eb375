//! Placeholder replaced by the engine suites.
