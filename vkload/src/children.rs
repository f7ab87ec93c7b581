//! Forked child processes: each increments its counter slot in shared memory, keeps a private
//! pattern region of its own, and sends heartbeat records to the parent through a pipe.
//!
//! All children share one process group, led by the first child, so that a restore has to
//! recreate a group whose id is not the member's own pid.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::chan::{Rx, Tx, STREAM_HEARTBEAT};
use crate::check::{self, fail, OrFail, Stall};
use crate::pattern::{self, PageState, PAGE_SIZE, PAGE_WORDS, SALT_CHILD};
use crate::ramfile::slot_word;
use crate::sys::{self, Forked};

const CHILD_PAGES: u64 = 16;
const HEARTBEAT_EVERY: u64 = 20;

struct Child {
    pid: libc::pid_t,
    rx: Rx,
    slot: &'static AtomicU64,
    last_aux: u64,
    beats: u64,
    stall_slot: Stall,
    stall_beat: Stall,
}

pub struct Children {
    list: Vec<Child>,
}

impl Children {
    /// Forks `n` children. Must run while the process is single-threaded. `slots_child` and
    /// `slots_parent` are two views of the same shared page (the RAM file's control page
    /// through mappings A and B, or one shared anonymous page).
    pub fn spawn(
        n: usize,
        slots_child: &'static [AtomicU64],
        slots_parent: &'static [AtomicU64],
        now_ms: u64,
        tick_ms: u64,
    ) -> Children {
        let ppid = std::process::id() as libc::pid_t;
        let mut list: Vec<Child> = Vec::new();
        let mut pgid = 0;
        for i in 0..n {
            let (r, w) = sys::pipe(true).or_fail("heartbeat pipe");
            match sys::fork().or_fail("fork") {
                Forked::Child => {
                    // Our copies of the parent's ends of earlier heartbeat pipes are not ours.
                    drop(r);
                    drop(list);
                    check::become_child(i);
                    child_main(i, w, &slots_child[slot_word(i)], ppid, pgid)
                }
                Forked::Parent(pid) => {
                    drop(w);
                    // Both sides set the group so that it is in place whichever runs first.
                    let target = if i == 0 { pid } else { pgid };
                    if let Err(e) = sys::setpgid(pid, target) {
                        if e.raw_os_error() != Some(libc::ESRCH) {
                            fail(format_args!("setpgid({pid}, {target}): {e}"));
                        }
                    }
                    if i == 0 {
                        pgid = pid;
                        check::set_child_pgid(pid);
                    }
                    list.push(Child {
                        pid,
                        rx: Rx::new(r, STREAM_HEARTBEAT + i as u64),
                        slot: &slots_parent[slot_word(i)],
                        last_aux: 0,
                        beats: 0,
                        stall_slot: Stall::new(format!("child {i} counter"), now_ms, tick_ms),
                        stall_beat: Stall::new(format!("child {i} heartbeat"), now_ms, tick_ms),
                    });
                }
            }
        }
        Children { list }
    }

    pub fn pids(&self) -> Vec<libc::pid_t> {
        self.list.iter().map(|c| c.pid).collect()
    }

    /// Checks that every child still runs, reads its heartbeats and checks its progress;
    /// returns the sum of the counters.
    pub fn tick(&mut self, now_ms: u64) -> Result<u64, String> {
        let mut sum = 0;
        for (i, c) in self.list.iter_mut().enumerate() {
            match sys::try_wait(c.pid) {
                Ok(None) => {}
                Ok(Some(st)) => return Err(format!("child {i} (pid {}) {}", c.pid, describe(st))),
                Err(e) => return Err(format!("waitpid child {i} (pid {}): {e}", c.pid)),
            }
            let (last, beats) = (&mut c.last_aux, &mut c.beats);
            while c
                .rx
                .read_once(|aux| {
                    if aux < *last {
                        return Err(format!(
                            "child {i} heartbeat went back from {last} to {aux}"
                        ));
                    }
                    *last = aux;
                    *beats += 1;
                    Ok(())
                })?
                .is_some()
            {}
            let v = c.slot.load(Ordering::Acquire);
            if c.last_aux > v {
                return Err(format!(
                    "child {i} heartbeat reported counter {} but its slot holds {v}",
                    c.last_aux
                ));
            }
            c.stall_slot.observe(v, now_ms)?;
            c.stall_beat.observe(c.beats, now_ms)?;
            sum += v;
        }
        Ok(sum)
    }
}

fn describe(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("was killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("changed state ({status:#x})")
    }
}

fn child_main(
    i: usize,
    heartbeat: File,
    slot: &'static AtomicU64,
    ppid: libc::pid_t,
    pgid: libc::pid_t,
) -> ! {
    sys::set_pdeathsig(libc::SIGKILL).or_fail("PR_SET_PDEATHSIG");
    // The parent may have died before the line above took effect.
    if sys::getppid() != ppid {
        sys::exit_now(0);
    }
    sys::setpgid(0, if i == 0 { 0 } else { pgid }).or_fail("setpgid");
    let salt = SALT_CHILD ^ i as u64;
    let region = sys::map_private(CHILD_PAGES as usize * PAGE_SIZE).or_fail("child mmap");
    let page = |p: u64| &region[p as usize * PAGE_WORDS..(p as usize + 1) * PAGE_WORDS];
    for p in 0..CHILD_PAGES {
        pattern::write_page(page(p), p, 0, salt);
    }
    let mut tx = Tx::new(heartbeat, STREAM_HEARTBEAT + i as u64);
    let mut counter = slot.load(Ordering::Relaxed);
    loop {
        let s = slot.load(Ordering::Relaxed);
        if s != counter {
            fail(format_args!("counter slot holds {s}, expected {counter}"));
        }
        // Write number `counter` goes to page counter % CHILD_PAGES as generation counter + 1.
        let p = counter % CHILD_PAGES;
        pattern::write_page(page(p), p, counter + 1, salt);
        counter += 1;
        slot.store(counter, Ordering::Release);

        let q = counter % CHILD_PAGES;
        let want = pattern::last_round_robin_write(counter, q, CHILD_PAGES).map_or(0, |w| w + 1);
        match pattern::check_page(page(q), q, salt) {
            Ok(PageState::Gen(g)) if g == want => {}
            other => fail(format_args!(
                "private page {q}: {other:?}, expected generation {want}"
            )),
        }
        if counter % HEARTBEAT_EVERY == 0 {
            // A full pipe just delays the heartbeat; the parent notices only a long silence.
            if let Err(e) = tx.send(counter) {
                fail(e);
            }
        }
        if sys::getppid() != ppid {
            sys::exit_now(0);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
