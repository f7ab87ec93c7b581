//! Command-line parsing, by hand: the grammar is tiny and vkload should stay dependency-free.

use std::net::Ipv4Addr;

pub const USAGE: &str = "\
usage: vkload [--mem MIB] [--threads N] [--children N] [--ram-file-mib M] [--dirty-mbps R]
              [--without FEAT[,FEAT...]] [--tick-ms MS] [--net TAP,IP/PREFIX[,MAC]] [--helper]
  --mem MIB            private anonymous pattern region (default 16, 0 = none)
  --threads N          TLS worker threads (default 2)
  --children N         forked child processes (default 1, at most 63)
  --ram-file-mib M     size of the memfd RAM file (default 4)
  --dirty-mbps R       pattern region rewrite rate in MiB/s (default 0 = 8 pages per tick)
  --without FEATS      disable features: threads, memfd, pipe, socketpair, itimer,
                       posix-timer, signals, children, eventfd, file, window (the RAM
                       file's pages written through a one-page mapping moved onto each)
  --tick-ms MS         console tick period (default 100)
  --verify-s S         seconds per full verification pass of the region (default 2)
  --net TAP,IP/PREFIX[,MAC]
                       attach to the existing tap TAP and answer ARP and ping for IP with
                       MAC (default 02:00 followed by the four bytes of IP); off by default
  --helper             also run a UML-style helper process that shares a thread's errno and
                       fails if its poll ever ends with another errno than EINTR (needs
                       threads); off by default
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
    Window,
}

impl Feature {
    pub const ALL: [Feature; 11] = [
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
        Feature::Window,
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
            Feature::Window => "window",
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
    pub net: Option<NetConfig>,
    /// `--helper` (see `helper`).
    pub helper: bool,
    disabled: u32,
}

/// `--net`: the tap to attach to and the guest identity to answer for on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub ip: Ipv4Addr,
    /// Only reported: the responder answers for `ip` alone and never routes.
    pub prefix: u8,
    pub mac: [u8; 6],
}

impl NetConfig {
    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
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
            net: None,
            helper: false,
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
            "--net" => cfg.net = Some(net(name, value()?)?),
            "--helper" if inline.is_none() => cfg.helper = true,
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

/// `TAP,IP/PREFIX[,MAC]`.
fn net(name: &str, value: &str) -> Result<NetConfig, String> {
    let err = |what: String| format!("{name}: {what} in '{value}' (expected TAP,IP/PREFIX[,MAC])");
    let parts: Vec<&str> = value.split(',').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(err("wrong number of comma-separated fields".to_string()));
    }
    let tap = parts[0];
    if !valid_ifname(tap) {
        return Err(err(format!("'{tap}' is not a valid interface name")));
    }
    let (ip, prefix) = parts[1]
        .split_once('/')
        .ok_or_else(|| err(format!("'{}' has no /PREFIX", parts[1])))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| err(format!("'{ip}' is not an IPv4 address")))?;
    // A guest address must be one a neighbour can send unicast frames to.
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(err(format!("{ip} is not a unicast address")));
    }
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| err(format!("prefix '{prefix}' is not in 1..=32")))?;
    let mac = match parts.get(2) {
        None => default_mac(ip),
        Some(m) => {
            mac(m).ok_or_else(|| err(format!("'{m}' is not a unicast MAC aa:bb:cc:dd:ee:ff")))?
        }
    };
    Ok(NetConfig {
        tap: tap.to_string(),
        ip,
        prefix,
        mac,
    })
}

/// Locally administered and derived from the IP, so that a guest keeps its MAC across
/// restarts and two guests on one segment differ whenever their IPs do.
pub fn default_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

fn mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    // A multicast source MAC is invalid and all-zero is no station; neighbours would drop
    // or misuse our replies.
    let unicast = mac[0] & 1 == 0 && mac != [0; 6];
    (parts.next().is_none() && unicast).then_some(mac)
}

/// The kernel's dev_valid_name, minus what the `,` separator already excludes.
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < libc::IFNAMSIZ
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
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

    fn net_of(value: &str) -> Result<NetConfig, String> {
        match parse(&["--net", value])? {
            Parsed::Run(c) => Ok(c.net.expect("--net given")),
            Parsed::Help => panic!("help"),
        }
    }

    #[test]
    fn net_off_by_default() {
        assert_eq!(run(&[]).net, None);
    }

    #[test]
    fn net_valid_with_default_mac() {
        let n = net_of("tap0,198.18.7.2/24").expect("valid");
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.ip, Ipv4Addr::new(198, 18, 7, 2));
        assert_eq!(n.prefix, 24);
        assert_eq!(n.mac, [0x02, 0x00, 0xc6, 0x12, 0x07, 0x02]);
        assert_eq!(n.mac_string(), "02:00:c6:12:07:02");
        // The = form and the other options still parse alongside.
        let c = run(&["--tick-ms", "50", "--net=vk-tap.1,198.19.0.9/32"]);
        assert_eq!(c.tick_ms, 50);
        let n = c.net.expect("--net given");
        assert_eq!((n.tap.as_str(), n.prefix), ("vk-tap.1", 32));
    }

    #[test]
    fn net_valid_with_mac() {
        let n = net_of("tap0,198.18.7.2/24,0a:BC:de:00:00:01").expect("valid");
        assert_eq!(n.mac, [0x0a, 0xbc, 0xde, 0x00, 0x00, 0x01]);
        assert_eq!(n.mac_string(), "0a:bc:de:00:00:01");
    }

    #[test]
    fn net_errors() {
        for bad in [
            "",
            "tap0",
            // missing prefix
            "tap0,198.18.7.2",
            "tap0,198.18.7.2/",
            "tap0,198.18.7.2/0",
            "tap0,198.18.7.2/33",
            "tap0,198.18.7.2/x",
            // bad IP
            "tap0,198.18.7/24",
            "tap0,198.18.7.256/24",
            "tap0,0.0.0.0/24",
            "tap0,255.255.255.255/24",
            "tap0,224.0.0.1/24",
            // bad MAC
            "tap0,198.18.7.2/24,",
            "tap0,198.18.7.2/24,02:00:00:00:00",
            "tap0,198.18.7.2/24,02:00:00:00:00:00:01",
            "tap0,198.18.7.2/24,02:00:00:00:00:0",
            "tap0,198.18.7.2/24,02:00:00:00:00:0g",
            "tap0,198.18.7.2/24,02-00-00-00-00-01",
            "tap0,198.18.7.2/24,01:00:5e:00:00:01",
            "tap0,198.18.7.2/24,00:00:00:00:00:00",
            // bad tap name
            ",198.18.7.2/24",
            "a-name-too-long-16,198.18.7.2/24",
            "tap/0,198.18.7.2/24",
            "tap:0,198.18.7.2/24",
            "tap 0,198.18.7.2/24",
            "..,198.18.7.2/24",
            // too many fields
            "tap0,198.18.7.2/24,02:00:00:00:00:01,x",
        ] {
            assert!(net_of(bad).is_err(), "'{bad}' was accepted");
        }
        assert!(parse(&["--net"]).is_err());
        let e = net_of("tap0,198.18.7.2").expect_err("no prefix");
        assert!(e.contains("no /PREFIX"), "{e}");
        let e = net_of("tap0,198.18.7.2/24,zz:00:00:00:00:01").expect_err("bad MAC");
        assert!(e.contains("MAC"), "{e}");
    }
}
