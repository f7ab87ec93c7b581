//! Facts about the host that a migration compares between source and destination: the CPU's
//! enabled xsave features, free memory and the kernel release.

use crate::{proc, Result, SysError};

const MEMINFO: &str = "/proc/meminfo";

/// `(XCR0, size of the standard-format xsave area for the features enabled in XCR0)`, or `(0, 0)`
/// when the CPU or the OS does not use xsave.
///
/// The size is `CPUID(0xD, 0).EBX`, which on Linux equals the length of a thread's
/// `NT_X86_XSTATE` regset ([`crate::ptrace::get_xstate`]); that regset carries the same XCR0
/// value in its bytes 464..472.
pub fn xsave_features() -> (u64, u32) {
    // std only reports "xsave" when CPUID.1:ECX has both XSAVE and OSXSAVE, i.e. when the OS
    // has set CR4.OSXSAVE and `xgetbv` does not fault.
    if !std::arch::is_x86_feature_detected!("xsave") {
        return (0, 0);
    }
    // SAFETY: `xgetbv0` needs the xsave target feature, which was detected at run time just
    // above (including OSXSAVE, so the instruction is enabled).
    let xcr0 = unsafe { xgetbv0() };
    let size = core::arch::x86_64::__cpuid_count(0xD, 0).ebx;
    (xcr0, size)
}

/// # Safety
/// The CPU must support xsave and the OS must have enabled it (CPUID.1:ECX.OSXSAVE).
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    // SAFETY: XCR0 is the one extended control register that exists on every xsave-capable
    // CPU; reading it has no side effects, and the caller guarantees xsave is enabled.
    unsafe { core::arch::x86_64::_xgetbv(0) }
}

/// `MemAvailable` of /proc/meminfo, in bytes: what can be allocated without swapping.
pub fn mem_available() -> Result<u64> {
    let text = proc::read(MEMINFO)?;
    parse_mem_available(&text).ok_or_else(|| {
        SysError::path(
            MEMINFO,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "it has no \"MemAvailable: N kB\" line (Linux 3.14 or newer has one)",
            ),
        )
    })
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let rest = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut words = rest.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// The running kernel's release (`uname -r`), e.g. "6.18.44"; empty if it cannot be read.
pub fn kernel_release() -> String {
    match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(_) => proc::read("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptrace;

    #[test]
    fn host_xsave_has_x87_and_sse() {
        let (xcr0, size) = xsave_features();
        assert_eq!(xcr0 & 0b11, 0b11, "xcr0 {xcr0:#x} lacks x87|SSE");
        assert!(size >= 576, "xsave area of {size} bytes");
    }

    #[test]
    fn host_mem_available_is_positive() {
        assert!(mem_available().expect("reads /proc/meminfo") > 0);
        assert_eq!(
            parse_mem_available("MemTotal: 10 kB\nMemAvailable:    2048 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_mem_available("MemTotal: 10 kB\n"), None);
    }

    #[test]
    fn host_kernel_release_is_uname() {
        let r = kernel_release();
        assert!(!r.is_empty());
        let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("reads");
        assert_eq!(r, osrelease.trim());
    }

    /// The xstate size and XCR0 we report are what the model stores from a thread's
    /// `NT_X86_XSTATE` regset: its length, and the u64 at bytes 464..472.
    #[test]
    fn host_xsave_matches_ptrace_regset() {
        let (xcr0, size) = xsave_features();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawns sleep");
        let pid = child.id() as i32;
        let got = (|| -> Result<Vec<u8>> {
            ptrace::seize(pid, ptrace::PTRACE_O_EXITKILL)?;
            ptrace::interrupt(pid)?;
            match ptrace::wait(pid)? {
                ptrace::Stop::Event(ptrace::PTRACE_EVENT_STOP) => {}
                other => {
                    return Err(SysError::Unexpected {
                        pid,
                        what: format!("stopped with {other:?}"),
                    })
                }
            }
            ptrace::get_xstate(pid)
        })();
        let _ = child.kill();
        let _ = child.wait();
        let area = got.expect("reads NT_X86_XSTATE of a stopped child");
        eprintln!("xcr0 {xcr0:#x} size {size} regset len {}", area.len());
        let mut word = [0u8; 8];
        word.copy_from_slice(&area[464..472]);
        let regset_xcr0 = u64::from_le_bytes(word);
        assert_eq!(
            (xcr0, size as usize),
            (regset_xcr0, area.len()),
            "(xgetbv, cpuid 0xD.0 ebx) vs (regset[464..472], regset length)"
        );
    }
}
