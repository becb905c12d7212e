//! The run's watchdog: after the time budget, the vCPU thread is kicked out of
//! `KVM_RUN` with a signal (repeated every 2 ms, in case one lands while the
//! thread is in the VMM), and the run loop, which also checks the deadline
//! after every exit, ends the run with a `timeout` outcome.
//!
//! One watchdog thread serves every run of the process: starting and
//! stopping a watch is a map update under a lock, with no thread to spawn or
//! join per run (joining costs milliseconds of scheduling latency on a busy
//! host). Kicks are sent under the same lock, so once a [`Watchdog`] is
//! dropped its thread is never signalled again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// How often an expired run's thread is kicked again until it stops.
const REKICK: Duration = Duration::from_millis(2);

struct Watch {
    deadline: Instant,
    thread: libc::pthread_t,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct Watches {
    next_id: u64,
    active: HashMap<u64, Watch>,
}

struct Service {
    sig: libc::c_int,
    watches: Mutex<Watches>,
    wake: Condvar,
}

fn service() -> &'static Service {
    static SERVICE: OnceLock<&'static Service> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let sig = SIGRTMIN();
        // Registration only fails for an invalid signal number, which SIGRTMIN is not.
        register_signal_handler(sig, kick_handler).expect("register the vCPU kick handler");
        let s: &'static Service = Box::leak(Box::new(Service {
            sig,
            watches: Mutex::new(Watches::default()),
            wake: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("vmm-watchdog".into())
            .spawn(move || s.serve())
            .expect("spawn the watchdog thread");
        s
    })
}

impl Service {
    fn serve(&self) {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            for watch in w.active.values_mut() {
                if now >= watch.deadline {
                    watch.fired.store(true, Ordering::SeqCst);
                    // SAFETY: the watched thread is alive: it removes its watch
                    // (under this lock) before it can end.
                    unsafe { libc::pthread_kill(watch.thread, self.sig) };
                    watch.deadline = now + REKICK;
                }
                next = Some(next.map_or(watch.deadline, |n| n.min(watch.deadline)));
            }
            w = match next {
                None => self.wake.wait(w).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    self.wake
                        .wait_timeout(w, t.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// A watch over the calling thread (the vCPU thread) for one run.
#[derive(Debug)]
pub struct Watchdog {
    id: u64,
    deadline: Instant,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    /// Starts watching the calling thread.
    pub fn start(budget: Duration) -> Self {
        let s = service();
        let deadline = Instant::now() + budget;
        let fired = Arc::new(AtomicBool::new(false));
        let mut w = s.watches.lock().unwrap_or_else(|e| e.into_inner());
        let id = w.next_id;
        w.next_id += 1;
        w.active.insert(
            id,
            Watch {
                deadline,
                // SAFETY: pthread_self has no preconditions.
                thread: unsafe { libc::pthread_self() },
                fired: fired.clone(),
            },
        );
        drop(w);
        s.wake.notify_one();
        Watchdog {
            id,
            deadline,
            fired,
        }
    }

    /// Whether the budget is used up.
    pub fn expired(&self) -> bool {
        self.fired.load(Ordering::SeqCst) || Instant::now() >= self.deadline
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let s = service();
        s.watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_thread_is_kicked_after_its_budget_and_not_before() {
        let t0 = Instant::now();
        let wd = Watchdog::start(Duration::from_millis(50));
        assert!(!wd.expired());
        // A blocking syscall stands in for KVM_RUN: the kick interrupts it.
        let mut fds = [0i32; 2];
        // SAFETY: pipe fills the two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let mut b = [0u8; 1];
        loop {
            // SAFETY: reading into a valid one-byte buffer.
            let r = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
            assert_eq!(r, -1, "nothing writes the pipe");
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EINTR)
            );
            if wd.expired() {
                break;
            }
        }
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(wd);
        // SAFETY: closing the fds made above.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    #[test]
    fn many_watches_come_and_go() {
        let wds: Vec<_> = (0..100)
            .map(|_| Watchdog::start(Duration::from_secs(60)))
            .collect();
        assert!(wds.iter().all(|w| !w.expired()));
        let ids: Vec<u64> = wds.iter().map(|w| w.id).collect();
        {
            let w = service().watches.lock().unwrap();
            assert!(ids.iter().all(|id| w.active.contains_key(id)));
        }
        drop(wds);
        let w = service().watches.lock().unwrap();
        assert!(ids.iter().all(|id| !w.active.contains_key(id)));
    }
}
