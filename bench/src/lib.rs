//! What the benchmarks share: their few command-line options, parsed by hand.

/// The value after option `name` in `args` (`--runs 3`), if given.
pub fn opt(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}
