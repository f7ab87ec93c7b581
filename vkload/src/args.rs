//! Command-line parsing, by hand: the grammar is tiny and vkload should stay dependency-free.

pub const USAGE: &str = "\
usage: vkload [--mem MIB] [--threads N] [--children N] [--ram-file-mib M] [--dirty-mbps R]
              [--without FEAT[,FEAT...]] [--tick-ms MS]
  --mem MIB            private anonymous pattern region (default 16, 0 = none)
  --threads N          TLS worker threads (default 2)
  --children N         forked child processes (default 1, at most 63)
  --ram-file-mib M     size of the memfd RAM file (default 4)
  --dirty-mbps R       pattern region rewrite rate in MiB/s (default 0 = 8 pages per tick)
  --without FEATS      disable features: threads, memfd, pipe, socketpair, itimer,
                       posix-timer, signals, children, eventfd, file
  --tick-ms MS         console tick period (default 100)
  --verify-s S         seconds per full verification pass of the region (default 2)
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Threads,
    Memfd,
    Pipe,
    Socketpair,
    Itimer,
    PosixTimer,
    Signals,
    Children,
    Eventfd,
    File,
}

impl Feature {
    pub const ALL: [Feature; 10] = [
        Feature::Threads,
        Feature::Memfd,
        Feature::Pipe,
        Feature::Socketpair,
        Feature::Itimer,
        Feature::PosixTimer,
        Feature::Signals,
        Feature::Children,
        Feature::Eventfd,
        Feature::File,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Threads => "threads",
            Feature::Memfd => "memfd",
            Feature::Pipe => "pipe",
            Feature::Socketpair => "socketpair",
            Feature::Itimer => "itimer",
            Feature::PosixTimer => "posix-timer",
            Feature::Signals => "signals",
            Feature::Children => "children",
            Feature::Eventfd => "eventfd",
            Feature::File => "file",
        }
    }

    fn from_name(s: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == s)
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mem_mib: u64,
    pub threads: usize,
    pub children: usize,
    pub ram_file_mib: u64,
    pub dirty_mbps: u64,
    pub tick_ms: u64,
    pub verify_s: u64,
    disabled: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mem_mib: 16,
            threads: 2,
            children: 1,
            ram_file_mib: 4,
            dirty_mbps: 0,
            tick_ms: 100,
            verify_s: 2,
            disabled: 0,
        }
    }
}

impl Config {
    pub fn has(&self, f: Feature) -> bool {
        self.disabled & f.bit() == 0
    }

    /// Number of children actually forked: `--without children` wins over `--children N`.
    pub fn child_count(&self) -> usize {
        if self.has(Feature::Children) {
            self.children
        } else {
            0
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Config),
    Help,
}

/// Parses the arguments after argv[0]. Accepts both `--opt VALUE` and `--opt=VALUE`.
pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Parsed, String> {
    let mut cfg = Config::default();
    let mut it = args.iter().map(|s| s.as_ref());
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg, None),
        };
        if !name.starts_with("--") {
            return Err(format!("unexpected argument '{arg}'"));
        }
        // Fetched inside the arms so that an unknown option is reported as such.
        let mut value = || match inline {
            Some(v) => Ok(v),
            None => it
                .next()
                .ok_or_else(|| format!("option {name} needs a value")),
        };
        match name {
            "--mem" => cfg.mem_mib = number(name, value()?, 0, 1 << 20)?,
            "--threads" => cfg.threads = number(name, value()?, 0, 256)? as usize,
            "--children" => {
                cfg.children = number(name, value()?, 0, crate::ramfile::MAX_SLOTS as u64)? as usize
            }
            "--ram-file-mib" => cfg.ram_file_mib = number(name, value()?, 1, 1 << 16)?,
            "--dirty-mbps" => cfg.dirty_mbps = number(name, value()?, 0, 1 << 20)?,
            "--tick-ms" => cfg.tick_ms = number(name, value()?, 1, 60_000)?,
            "--verify-s" => cfg.verify_s = number(name, value()?, 1, 3600)?,
            "--without" => {
                // Empty items are tolerated so that scripts can pass `--without "$LIST"`.
                for feat in value()?.split(',').filter(|s| !s.is_empty()) {
                    let f = Feature::from_name(feat)
                        .ok_or_else(|| format!("unknown feature '{feat}'"))?;
                    cfg.disabled |= f.bit();
                }
            }
            _ => return Err(format!("unknown option '{name}'")),
        }
    }
    Ok(Parsed::Run(cfg))
}

fn number(name: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = value
        .parse()
        .map_err(|_| format!("{name}: '{value}' is not a non-negative integer"))?;
    if n < min || n > max {
        return Err(format!("{name}: {n} is outside {min}..={max}"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse(args) {
            Ok(Parsed::Run(c)) => c,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[]);
        assert_eq!(c, Config::default());
        assert_eq!((c.mem_mib, c.threads, c.children), (16, 2, 1));
        assert_eq!((c.ram_file_mib, c.dirty_mbps, c.tick_ms), (4, 0, 100));
        assert!(Feature::ALL.iter().all(|&f| c.has(f)));
        assert_eq!(c.child_count(), 1);
    }

    #[test]
    fn values_and_without() {
        let c = run(&[
            "--mem",
            "64",
            "--threads=4",
            "--children",
            "3",
            "--without",
            "socketpair,eventfd",
            "--without=children,",
            "--tick-ms",
            "50",
        ]);
        assert_eq!(
            (c.mem_mib, c.threads, c.children, c.tick_ms),
            (64, 4, 3, 50)
        );
        assert!(!c.has(Feature::Socketpair));
        assert!(!c.has(Feature::Eventfd));
        assert!(!c.has(Feature::Children));
        assert!(c.has(Feature::Pipe) && c.has(Feature::PosixTimer));
        assert_eq!(c.child_count(), 0);
    }

    #[test]
    fn all_feature_names_round_trip() {
        for f in Feature::ALL {
            assert_eq!(Feature::from_name(f.name()), Some(f));
        }
    }

    #[test]
    fn errors() {
        assert!(parse(&["--without", "sockets"]).is_err());
        assert!(parse(&["--mem"]).is_err());
        assert!(parse(&["--mem", "-1"]).is_err());
        assert!(parse(&["--children", "64"]).is_err());
        assert!(parse(&["--tick-ms", "0"]).is_err());
        assert!(parse(&["--bogus", "1"]).is_err());
        assert_eq!(
            parse(&["--bogus"]),
            Err("unknown option '--bogus'".to_string())
        );
        assert!(parse(&["stray"]).is_err());
        assert_eq!(parse(&["--help"]), Ok(Parsed::Help));
    }
}
