//! # converge-tests
//!
//! The test support of Converge: [`sim`], a deterministic simulator that
//! runs many sync engines in one thread, and [`scenario`], seeded random
//! scenarios over it. The tests themselves live in `tests/`.

pub mod scenario;
pub mod sim;
