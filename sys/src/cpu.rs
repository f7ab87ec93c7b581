//! Running a tracer and its stopped tracees on one CPU while they talk.
//!
//! Every ptrace round trip (resume a tracee, wait for its next stop) between two CPUs costs a
//! cross-CPU wake-up, and on a virtual machine an idle CPU's wake-up is slow; on one CPU it is
//! a plain context switch. Measured on the 2-core development VM: 18–25 µs against 5.8 µs per
//! syscall stop, and an injected syscall takes two. While a vkernel is frozen its threads only
//! ever run for us, so they lose nothing by sharing our CPU; their own affinity is put back
//! before they are let go, so the vkernel never sees the change.

use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The calling thread and the tasks [`OneCpu::add`]ed to it run on the CPU the caller ran on
/// when it was made; everything goes back as it was on [`OneCpu::release`] or drop.
#[derive(Debug)]
pub struct OneCpu {
    cpu: CpuSet,
    /// The calling thread's own mask (its tid is 0: "the caller").
    ours: CpuSet,
    pinned: Vec<(i32, CpuSet)>,
}

impl OneCpu {
    /// Pin the calling thread to the CPU it runs on. None when the kernel refuses (a cpuset
    /// that moved meanwhile): the caller just goes on slower.
    pub fn new() -> Option<OneCpu> {
        let ours = sched_getaffinity(Pid::from_raw(0)).ok()?;
        let mut cpu = CpuSet::new();
        cpu.set(sched_getcpu().ok()?).ok()?;
        sched_setaffinity(Pid::from_raw(0), &cpu).ok()?;
        Some(OneCpu {
            cpu,
            ours,
            pinned: Vec::new(),
        })
    }

    /// Move the calling thread, one the pinned caller started (it inherited the single CPU),
    /// to the caller's other CPUs: work that runs beside the tracer must not queue up behind
    /// it, nor hold up the threads the tracer starts and waits for. Where the caller had no
    /// other CPU it gets the caller's whole mask.
    pub fn move_elsewhere(&self) {
        let mut rest = self.ours;
        for c in 0..CpuSet::count() {
            if self.cpu.is_set(c).unwrap_or(false) {
                let _ = rest.unset(c);
            }
        }
        let any = (0..CpuSet::count()).any(|c| rest.is_set(c).unwrap_or(false));
        let _ = sched_setaffinity(Pid::from_raw(0), if any { &rest } else { &self.ours });
    }

    /// Run `tid` on our CPU from its next run on. A task that may not (its cpuset excludes our
    /// CPU) is left alone: only speed depends on it.
    pub fn add(&mut self, tid: i32) {
        if let Ok(mask) = sched_getaffinity(Pid::from_raw(tid)) {
            self.pin(tid, mask);
        }
    }

    /// Run `tid`, a task we created (which inherited whatever mask its creator had), on our
    /// CPU; on release it gets the mask the calling thread had, as if we had never pinned it.
    pub fn add_new(&mut self, tid: i32) {
        self.pin(tid, self.ours);
    }

    /// Pin `tid` (once) and give it `release_to` on release.
    fn pin(&mut self, tid: i32, release_to: CpuSet) {
        if self.pinned.iter().any(|(t, _)| *t == tid) {
            return;
        }
        if sched_setaffinity(Pid::from_raw(tid), &self.cpu).is_ok() {
            self.pinned.push((tid, release_to));
        }
    }

    /// Every task's own mask back, and ours. A task that has gone meanwhile is skipped.
    pub fn release(&mut self) {
        for (tid, mask) in self.pinned.drain(..) {
            let _ = sched_setaffinity(Pid::from_raw(tid), &mask);
        }
        let _ = sched_setaffinity(Pid::from_raw(0), &self.ours);
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_of(pid: i32) -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(pid)).expect("sched_getaffinity");
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect()
    }

    #[test]
    fn tasks_share_our_cpu_until_released_and_then_have_their_own_masks_back() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let before_child = mask_of(pid);
        let before_us = mask_of(0);
        let mut one = OneCpu::new().expect("pin ourselves");
        one.add(pid);
        let ours = mask_of(0);
        assert_eq!(ours.len(), 1, "we run on one CPU");
        assert_eq!(mask_of(pid), ours, "the task runs on ours");
        drop(one);
        assert_eq!(mask_of(pid), before_child);
        assert_eq!(mask_of(0), before_us);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_task_we_made_gets_our_old_mask_on_release() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let before_us = mask_of(0);
        let mut one = OneCpu::new().expect("pin ourselves");
        // As if it had inherited a pinned mask from a pinned parent.
        let mut narrow = CpuSet::new();
        narrow.set(mask_of(0)[0]).expect("cpu");
        sched_setaffinity(Pid::from_raw(pid), &narrow).expect("narrow it");
        one.add_new(pid);
        one.release();
        assert_eq!(mask_of(pid), before_us);
        let _ = child.kill();
        let _ = child.wait();
    }
}
