//! Tests of the /proc parsers against text captured on a Linux 6.18 x86_64 host
//! (`tests/fixtures/procfs/`, from a small C program holding every kind of fd and timer that
//! vkmigrate reads), plus malformed and random input.

// Tests may unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use vkm_common::error::CommonError;
use vkm_common::procfs::*;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/procfs/",
            $name
        ))
    };
}

const SMAPS: &str = fixture!("smaps");
const MAPS: &str = fixture!("maps");
const STATUS: &str = fixture!("status");
const STATUS_NESTED: &str = fixture!("status_nested");
const STATUS_ZOMBIE: &str = fixture!("status_zombie");
const STAT: &str = fixture!("stat");
const STAT_NESTED: &str = fixture!("stat_nested");
const STAT_ZOMBIE: &str = fixture!("stat_zombie");
const LIMITS: &str = fixture!("limits");
const TIMERS: &str = fixture!("timers");
const TIMENS: &str = fixture!("timens_offsets");
const TIMENS_SET: &str = fixture!("timens_offsets_set");
const CHILDREN: &str = fixture!("children");
const FDINFO: [&str; 9] = [
    fixture!("fdinfo_epoll"),
    fixture!("fdinfo_eventfd"),
    fixture!("fdinfo_file"),
    fixture!("fdinfo_memfd"),
    fixture!("fdinfo_signalfd"),
    fixture!("fdinfo_timerfd"),
    fixture!("fdinfo_timerfd_abs"),
    fixture!("fdinfo_tty"),
    fixture!("fdinfo_tun"),
];

fn parse_err_file(e: CommonError) -> &'static str {
    match e {
        CommonError::Parse { file, .. } => file,
        other => panic!("not a parse error: {other:?}"),
    }
}

#[test]
fn smaps_fixture() {
    let vmas = parse_smaps(SMAPS).unwrap();
    assert_eq!(vmas.len(), 31);

    let first = &vmas[0];
    assert_eq!(
        (first.start, first.end),
        (0x5596_99c9_b000, 0x5596_99c9_c000)
    );
    assert!(first.read && !first.write && !first.exec && !first.shared);
    assert_eq!(
        (first.dev_major, first.dev_minor, first.inode),
        (0xfe, 0, 10010873)
    );
    assert_eq!(first.path.as_deref(), Some("/tmp/fx/cap"));
    assert_eq!(first.vm_flags, ["rd", "mr", "mw", "me"]);
    assert_eq!((first.size_kb, first.rss_kb, first.anonymous_kb), (4, 4, 0));

    let memfd = vmas
        .iter()
        .find(|v| v.path.as_deref() == Some("/memfd:guest ram (deleted)"))
        .unwrap();
    assert_eq!(
        (memfd.start, memfd.end),
        (0x7f3e_3989_6000, 0x7f3e_3999_6000)
    );
    assert!(memfd.shared && memfd.read && memfd.write && !memfd.exec);
    assert!(memfd.is_deleted());
    assert_eq!(
        (memfd.dev_major, memfd.dev_minor, memfd.inode),
        (0, 1, 1025)
    );
    assert_eq!(
        (memfd.size_kb, memfd.rss_kb, memfd.anonymous_kb),
        (1024, 64, 0)
    );
    assert!(memfd.has_flag("sh") && memfd.has_flag("ms"));
    assert_eq!(memfd.prot(), 3);

    let file = vmas
        .iter()
        .find(|v| v.path.as_deref() == Some("/tmp/fx/my file (x).bin (deleted)"))
        .unwrap();
    assert_eq!((file.dev_major, file.inode), (0xfe, 10010869));

    let rwx = vmas.iter().find(|v| v.exec && v.write).unwrap();
    assert_eq!(rwx.path, None);
    assert_eq!(rwx.prot(), 7);

    let stack = vmas
        .iter()
        .find(|v| v.path.as_deref() == Some("[stack]"))
        .unwrap();
    assert!(stack.has_flag("gd"));
    assert_eq!(
        (
            stack.size_kb,
            stack.rss_kb,
            stack.anonymous_kb,
            stack.swap_kb
        ),
        (1040, 36, 36, 0)
    );
    assert_eq!(stack.len(), 1040 * 1024);

    let vsyscall = vmas.last().unwrap();
    assert_eq!(vsyscall.path.as_deref(), Some("[vsyscall]"));
    assert_eq!(vsyscall.start, 0xffff_ffff_ff60_0000);
    assert!(vsyscall.exec && !vsyscall.read);
}

#[test]
fn maps_fixture_matches_smaps() {
    let maps = parse_maps(MAPS).unwrap();
    let smaps = parse_smaps(SMAPS).unwrap();
    assert_eq!(maps.len(), smaps.len());
    for (m, s) in maps.iter().zip(&smaps) {
        let stripped = Vma {
            vm_flags: vec![],
            size_kb: 0,
            rss_kb: 0,
            anonymous_kb: 0,
            swap_kb: 0,
            ..s.clone()
        };
        assert_eq!(m, &stripped);
        assert_eq!(s.size_kb * 1024, s.len());
    }
}

#[test]
fn maps_names_and_errors() {
    let v = parse_maps("00400000-00401000 r-xp 00000000 00:00 0 \n").unwrap();
    assert_eq!(v[0].path, None);
    let v = parse_maps("00400000-00401000 r-xp 00000000 00:00 0    [anon:my  name]").unwrap();
    assert_eq!(v[0].path.as_deref(), Some("[anon:my  name]"));
    let v = parse_maps("7f0000000000-7f0000001000 rw-s 100000000 103:02 12 /a b\\012c (deleted)\n")
        .unwrap();
    assert_eq!(v[0].offset, 0x1_0000_0000);
    assert_eq!((v[0].dev_major, v[0].dev_minor), (0x103, 2));
    assert_eq!(v[0].path.as_deref(), Some("/a b\\012c (deleted)"));

    for bad in [
        "00400000-00401000 r-xq 00000000 00:00 0",
        "00400000-00401000 rwx 00000000 00:00 0",
        "00401000-00400000 r-xp 00000000 00:00 0",
        "00400000-00400000 r-xp 00000000 00:00 0",
        "00400000 r-xp 00000000 00:00 0",
        "0040000g-00401000 r-xp 00000000 00:00 0",
        "00400000-00401000 r-xp 00000000 0000 0",
        "00400000-00401000 r-xp 00000000 00:00 -1",
        "00400000-00401000 r-xp 00000000 00:00",
        "",
        "+0400000-00401000 r-xp 00000000 00:00 0",
    ] {
        let e = parse_maps(&format!("{bad}\n")).unwrap_err();
        assert_eq!(parse_err_file(e), "maps", "{bad:?}");
    }
    // smaps-specific errors.
    let e = parse_smaps("Rss: 4 kB\n").unwrap_err();
    assert!(matches!(&e, CommonError::Parse { reason, .. } if reason.contains("before any")));
    let e = parse_smaps("00400000-00401000 r-xp 00000000 00:00 0\nRss: 4 MB\n").unwrap_err();
    assert!(matches!(&e, CommonError::Parse { file: "smaps", line, .. } if line == "Rss: 4 MB"));
    // Unknown fields are ignored, whatever they hold.
    let v =
        parse_smaps("00400000-00401000 r-xp 00000000 00:00 0\nNewField: ???\nRss: 4 kB\n").unwrap();
    assert_eq!(v[0].rss_kb, 4);
}

#[test]
fn status_fixtures() {
    let s = parse_status(STATUS).unwrap();
    assert_eq!(s.name, "a) b (c)");
    assert_eq!(s.umask, Some(0o027));
    assert_eq!(s.state, 'R');
    assert_eq!((s.tgid, s.pid, s.ppid, s.tracer_pid), (3773, 3773, 3761, 0));
    assert_eq!((s.uid, s.gid), ([0; 4], [0; 4]));
    assert_eq!(s.nspid, [3773]);
    assert_eq!(s.nstgid, [3773]);
    assert_eq!(s.nspgid, [3761]);
    assert_eq!(s.nssid, [2897]);
    assert_eq!(s.threads, 3);
    assert_eq!((s.sig_pnd, s.shd_pnd), (0, 0));
    assert_eq!(s.sig_blk, 0x0000_0008_0000_0200);
    assert_eq!(s.sig_ign, 0x1001);
    assert_eq!(s.sig_cgt, 0x0000_0001_0000_0800);
    assert_eq!(s.cap_eff, 0x0000_01ff_feff_ffff);
    assert!(!s.no_new_privs);
    assert_eq!(s.seccomp, 0);

    let n = parse_status(STATUS_NESTED).unwrap();
    assert_eq!(n.nspid, [3908, 1]);
    assert_eq!(n.nstgid, [3908, 1]);
    assert_eq!(n.nspgid, [3903, 0]);
    assert_eq!(n.nssid, [2897, 0]);

    let z = parse_status(STATUS_ZOMBIE).unwrap();
    assert_eq!(z.state, 'Z');
    assert_eq!(z.umask, None);
}

#[test]
fn status_errors() {
    let without_nspid: String = STATUS
        .lines()
        .filter(|l| !l.starts_with("NSpid:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = parse_status(&without_nspid).unwrap_err();
    assert!(
        matches!(&e, CommonError::Parse { file: "status", reason, .. } if reason.contains("NSpid"))
    );

    for (from, to) in [
        ("SigBlk:\t0000000800000200", "SigBlk:\t00000008000002zz"),
        ("Umask:\t0027", "Umask:\t0028"),
        ("NSpid:\t3773", "NSpid:\t"),
        ("NoNewPrivs:\t0", "NoNewPrivs:\t2"),
        ("Threads:\t3", "Threads:\t-3"),
        ("Uid:\t0\t0\t0\t0", "Uid:\t0\t0\t0"),
        ("Tgid:\t3773", "Tgid 3773"),
    ] {
        assert!(STATUS.contains(from));
        let e = parse_status(&STATUS.replace(from, to)).unwrap_err();
        assert!(
            matches!(&e, CommonError::Parse { file: "status", line, .. } if line == to),
            "{to:?}: {e:?}"
        );
    }
    // Unknown lines are ignored.
    assert!(parse_status(&format!("{STATUS}Future_field:\tanything\n")).is_ok());
}

#[test]
fn stat_fixtures() {
    let s = parse_stat(STAT).unwrap();
    assert_eq!(s.pid, 3773);
    assert_eq!(s.comm, "a) b (c)");
    assert_eq!(s.state, 'R');
    assert_eq!(
        (s.ppid, s.pgrp, s.session, s.tty_nr, s.tpgid),
        (3761, 3761, 2897, 0, -1)
    );
    assert_eq!(s.flags, 4194560);
    assert_eq!(s.num_threads, 3);
    assert_eq!(s.start_time, 38233);
    assert_eq!(
        (s.start_code, s.end_code, s.start_stack),
        (94105313591296, 94105313594385, 140730598664256)
    );
    assert_eq!(s.exit_signal, 17);
    assert_eq!(
        [
            s.start_data,
            s.end_data,
            s.start_brk,
            s.arg_start,
            s.arg_end,
            s.env_start,
            s.env_end
        ],
        [
            94105313603024,
            94105313603896,
            94105730658304,
            140730598673132,
            140730598673150,
            140730598673150,
            140730598674418
        ]
    );

    let n = parse_stat(STAT_NESTED).unwrap();
    assert_eq!(
        (n.pid, n.comm.as_str(), n.state, n.ppid),
        (3908, "sleep", 'S', 3906)
    );

    let z = parse_stat(STAT_ZOMBIE).unwrap();
    assert_eq!(
        (z.state, z.start_code, z.env_end, z.exit_signal),
        ('Z', 0, 0, 17)
    );

    // A comm with a newline and a trailing ')' (raw in stat).
    let odd = STAT.replace("(a) b (c))", "(x\ny) ))");
    assert_eq!(parse_stat(&odd).unwrap().comm, "x\ny) )");
}

#[test]
fn stat_errors() {
    for bad in [
        "",
        "3773",
        "3773 (cat",
        "3773 cat) R 1",
        ") 3773 (cat",
        "x (cat) R 1 2 3",
        "3773 (cat) R 1 2 3",
    ] {
        assert_eq!(
            parse_err_file(parse_stat(bad).unwrap_err()),
            "stat",
            "{bad:?}"
        );
    }
    let bad_field = STAT.replace(" 38233 ", " 3823x ");
    let e = parse_stat(&bad_field).unwrap_err();
    assert!(
        matches!(&e, CommonError::Parse { reason, .. } if reason.contains("22")),
        "{e:?}"
    );
    let bad_state = STAT.replace(") R ", ") RR ");
    assert!(parse_stat(&bad_state).is_err());
}

#[test]
fn fdinfo_fixtures() {
    let [epoll, eventfd, file, memfd, signalfd, timerfd, timerfd_abs, tty, tun] =
        FDINFO.map(|t| parse_fdinfo(t).unwrap());

    assert_eq!(
        (epoll.pos, epoll.flags, epoll.mnt_id, epoll.ino),
        (0, 0o2, 17, 1044)
    );
    assert_eq!(
        epoll.epoll,
        [
            EpollTarget {
                tfd: 7,
                events: 0x1d,
                data: 0xdead_0000_0007,
                pos: 0,
                ino: 0x414,
                sdev: 0x10
            },
            EpollTarget {
                tfd: 5,
                events: 0x8000_0019,
                data: 0xdead_beef_cafe,
                pos: 0,
                ino: 0x414,
                sdev: 0x10
            },
        ]
    );
    assert!(epoll.other.is_empty());

    assert_eq!(eventfd.flags, 0o2004002);
    assert_eq!(
        eventfd.eventfd,
        Some(EventFdInfo {
            count: 42,
            id: 1,
            semaphore: true
        })
    );

    assert_eq!(
        (file.flags, file.mnt_id, file.ino),
        (0o100002, 27, 10010869)
    );
    assert_eq!(
        (file.eventfd, file.timerfd, file.signalfd_sigmask),
        (None, None, None)
    );
    assert!(file.epoll.is_empty() && file.other.is_empty() && file.tun_iff.is_none());
    assert_eq!((memfd.mnt_id, memfd.ino), (0, 1025));

    assert_eq!(signalfd.signalfd_sigmask, Some(0x0000_0008_0000_0200));
    assert_eq!(signalfd.flags, 0o2000002);

    assert_eq!(
        timerfd.timerfd,
        Some(TimerFdInfo {
            clockid: 1,
            ticks: 0,
            settime_flags: 0,
            it_value: (99, 847169481),
            it_interval: (1, 500),
        })
    );
    let abs = timerfd_abs.timerfd.unwrap();
    assert_eq!(
        (abs.clockid, abs.settime_flags, abs.it_interval),
        (0, 1, (0, 0))
    );
    assert_eq!(timerfd_abs.flags, 0o4002);

    assert_eq!((tty.flags, tty.ino), (0o100000, 3));
    assert_eq!(tun.tun_iff.as_deref(), Some("vkmfx0"));
}

#[test]
fn fdinfo_other_lines_and_errors() {
    let text = "pos:\t-5\nflags:\t02\nmnt_id:\t1\nino:\t2\nlock:\t1: POSIX  ADVISORY  WRITE 12 fe:00:99 0 EOF\n\
                inotify wd:1 ino:5 sdev:10 mask:fff ignored_mask:0\n";
    let i = parse_fdinfo(text).unwrap();
    assert_eq!(i.pos, -5);
    assert_eq!(
        i.other,
        [
            (
                "lock".to_owned(),
                "1: POSIX  ADVISORY  WRITE 12 fe:00:99 0 EOF".to_owned()
            ),
            (
                "inotify wd".to_owned(),
                "1 ino:5 sdev:10 mask:fff ignored_mask:0".to_owned()
            ),
        ]
    );
    let base = "pos:\t0\nflags:\t02\nmnt_id:\t1\nino:\t2\n";
    for bad in [
        "pos:\t0\nflags:\t02\nmnt_id:\t1\n".to_owned(),
        base.replace("02", "09"),
        format!("{base}eventfd-count: 2a\n"),
        format!("{base}eventfd-count: 2a\neventfd-id: 1\neventfd-semaphore: 2\n"),
        format!("{base}clockid: 1\nticks: 0\n"),
        format!(
            "{base}clockid: 1\nticks: 0\nsettime flags: 00\nit_value: (1 2)\nit_interval: (0, 0)\n"
        ),
        format!("{base}tfd:        7 events:       1d data:\n"),
        format!("{base}tfd: x events: 1 data: 2 pos:0 ino:1 sdev:1\n"),
        format!("{base}no colon here\n"),
    ] {
        assert_eq!(
            parse_err_file(parse_fdinfo(&bad).unwrap_err()),
            "fdinfo",
            "{bad:?}"
        );
    }
}

#[test]
fn limits_fixture() {
    let l = parse_limits(LIMITS).unwrap();
    assert_eq!(l.len(), 16);
    for (i, lim) in l.iter().enumerate() {
        assert_eq!(lim.resource, i as u32);
        assert_eq!(lim.name, RLIMITS[i].0);
    }
    assert_eq!((l[0].soft, l[0].hard), (RLIM_INFINITY, RLIM_INFINITY));
    assert_eq!((l[3].soft, l[3].hard), (8388608, RLIM_INFINITY));
    assert_eq!(
        (l[7].name, l[7].soft, l[7].hard),
        ("Max open files", 20000, 20000)
    );
    assert_eq!((l[13].soft, l[13].hard), (0, 0)); // no unit column
    assert_eq!(l[15].soft, RLIM_INFINITY);
    assert_eq!(RLIMITS[9].2, "RLIMIT_AS");

    for bad in [
        "",
        "Max cpu time              unlimited            unlimited            seconds\n",
        &LIMITS.replace("Max cpu time   ", "Max gpu time   "),
        &LIMITS.replace(
            "8388608              unlimited",
            "8388608              unlimted",
        ),
        &LIMITS.replace("0                    unlimited            bytes", "0"),
        &LIMITS.replace("seconds", "seconds extra"),
    ] {
        assert_eq!(
            parse_err_file(parse_limits(bad).unwrap_err()),
            "limits",
            "{bad:?}"
        );
    }
}

#[test]
fn timers_fixture() {
    let t = parse_timers(TIMERS).unwrap();
    assert_eq!(
        t,
        [
            PosixTimerInfo {
                id: 2,
                signal: 14,
                sigev_value: 7,
                notify: TimerNotify::Signal,
                thread: true,
                target: 3773,
                clockid: -6,
            },
            PosixTimerInfo {
                id: 1,
                signal: 37,
                sigev_value: 0x1234_abcd,
                notify: TimerNotify::None,
                thread: false,
                target: 3773,
                clockid: 7,
            },
            PosixTimerInfo {
                id: 0,
                signal: 37,
                sigev_value: 0x1234_abcd,
                notify: TimerNotify::Signal,
                thread: false,
                target: 3773,
                clockid: 1,
            },
        ]
    );
    assert_eq!(
        t.iter().map(|t| t.sigev_notify()).collect::<Vec<_>>(),
        [4, 1, 0]
    );
    assert!(parse_timers("").unwrap().is_empty());

    for bad in [
        "ID: 2\n",
        "ID: 2\nsignal: 14/0000000000000007\nnotify: signal/tid.3773\n",
        "signal: 14/0000000000000007\n",
        "ID: x\n",
        "ID: 2\nsignal: 14\n",
        "ID: 2\nsignal: 14/00000000000000zz\n",
        "ID: 2\nsignal: 14/7\nnotify: bogus/tid.1\n",
        "ID: 2\nsignal: 14/7\nnotify: signal/xid.1\n",
        "ID: 2\nsignal: 14/7\nnotify: signal/tid\n",
        "ID: 2\nsignal: 14/7\nnotify: signal/tid.1\nClockID: \n",
    ] {
        assert_eq!(
            parse_err_file(parse_timers(bad).unwrap_err()),
            "timers",
            "{bad:?}"
        );
    }
}

#[test]
fn timens_offsets_round_trip() {
    assert_eq!(
        parse_timens_offsets(TIMENS).unwrap(),
        TimensOffsets::default()
    );
    let set = parse_timens_offsets(TIMENS_SET).unwrap();
    assert_eq!(
        set,
        TimensOffsets {
            monotonic: TimeOffset {
                secs: 100,
                nsecs: 0
            },
            boottime: TimeOffset {
                secs: -200,
                nsecs: 0
            },
        }
    );
    let o = TimensOffsets {
        monotonic: TimeOffset {
            secs: -3,
            nsecs: 999_999_999,
        },
        boottime: TimeOffset {
            secs: 1 << 40,
            nsecs: 1,
        },
    };
    let text = format_timens_offsets(&o);
    assert_eq!(text, "monotonic -3 999999999\nboottime 1099511627776 1\n");
    assert_eq!(parse_timens_offsets(&text).unwrap(), o);

    for bad in [
        "",
        "monotonic 0 0\n",
        "monotonic 0 0\nboottime 0 1000000000\n",
        "monotonic 0 0\nboottime 0 -1\n",
        "monotonic 0 0\nrealtime 0 0\n",
        "monotonic 0\nboottime 0 0\n",
        "monotonic 0 0 0\nboottime 0 0\n",
    ] {
        assert_eq!(
            parse_err_file(parse_timens_offsets(bad).unwrap_err()),
            "timens_offsets",
            "{bad:?}"
        );
    }
}

#[test]
fn children_fixture() {
    assert_eq!(parse_children(CHILDREN).unwrap(), [3776, 3777]);
    assert!(parse_children("").unwrap().is_empty());
    assert_eq!(parse_children("5\n").unwrap(), [5]);
    for bad in ["1 x", "0", "-4", "99999999999"] {
        assert_eq!(parse_err_file(parse_children(bad).unwrap_err()), "children");
    }
}

/// Runs every parser on `text`; only panics matter here.
fn run_all(text: &str) {
    let _ = parse_maps(text);
    let _ = parse_smaps(text);
    let _ = parse_status(text);
    let _ = parse_stat(text);
    let _ = parse_fdinfo(text);
    let _ = parse_limits(text);
    let _ = parse_timers(text);
    let _ = parse_timens_offsets(text);
    let _ = parse_children(text);
}

#[test]
fn no_parser_panics_on_truncated_or_mutated_fixtures() {
    // The big smaps is the same few line shapes repeated: its first two mappings cover them and
    // keep this quadratic test fast in debug builds.
    let smaps_head = &SMAPS[..SMAPS[..1600].rfind('\n').unwrap() + 1];
    let mut all = vec![smaps_head, STATUS, STATUS_ZOMBIE, STAT, LIMITS];
    all.extend([TIMERS, TIMENS, CHILDREN]);
    all.extend(FDINFO);
    for text in &all {
        for (i, _) in text.char_indices() {
            run_all(&text[..i]);
        }
    }

    // Random edits drawn from an alphabet of the characters these formats give meaning to.
    const ALPHABET: &[&str] = &[
        "0",
        "1",
        "7",
        "9",
        "a",
        "f",
        "z",
        "-",
        ":",
        " ",
        "\t",
        "\n",
        "(",
        ")",
        "/",
        ".",
        ",",
        "kB",
        "é",
        "\u{0}",
        "ffffffffffffffffff",
        "-9223372036854775809",
        "unlimited",
        "tfd:",
        "ID: ",
        "VmFlags:",
    ];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for text in &all {
        for _ in 0..200 {
            let mut s = (*text).to_owned();
            for _ in 0..1 + next() % 4 {
                let mut at = (next() as usize) % (s.len() + 1);
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                match next() % 3 {
                    0 => s.insert_str(at, ALPHABET[(next() as usize) % ALPHABET.len()]),
                    1 => {
                        let mut end = (at + 1 + (next() as usize) % 16).min(s.len());
                        while !s.is_char_boundary(end) {
                            end += 1;
                        }
                        s.replace_range(at..end, "");
                    }
                    _ => {
                        s.truncate(at);
                    }
                }
            }
            run_all(&s);
        }
    }
    for _ in 0..3000 {
        let n = (next() % 40) as usize;
        let s: String = (0..n)
            .map(|_| ALPHABET[(next() as usize) % ALPHABET.len()])
            .collect();
        run_all(&s);
    }
}

#[test]
fn parse_error_messages_are_short_and_quoted() {
    let long = format!("{}\n", "x".repeat(1000));
    let e = parse_maps(&long).unwrap_err();
    let CommonError::Parse { line, .. } = &e else {
        panic!("{e:?}");
    };
    assert!(line.len() < 200);
    let msg = e.to_string();
    assert!(msg.starts_with("Malformed /proc/PID/maps: "), "{msg}");
    let e = parse_status("Name\tx\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Malformed /proc/PID/status: no ':' in line \"Name\\tx\""
    );
}
