//! One module per subcommand: argument parsing and a call into the library crates.

pub mod attention;
pub mod bench;
pub mod classify;
pub mod data;
pub mod eval;
pub mod generate;
pub mod invert;
pub mod report;
pub mod score;
pub mod shapes;
pub mod train;
