//! The run's watchdog: after the time budget, it kicks the vCPU thread out of
//! `KVM_RUN` with a signal (repeatedly, in case one lands while the thread is
//! in the VMM), and the run loop, which also checks the deadline after every
//! exit, ends the run with a `timeout` outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts `KVM_RUN` (its handler does nothing: the point
/// is the `EINTR`).
fn kick_signal() -> libc::c_int {
    static SIG: OnceLock<libc::c_int> = OnceLock::new();
    *SIG.get_or_init(|| {
        let sig = SIGRTMIN();
        // Registration only fails for an invalid signal number, which SIGRTMIN is not.
        register_signal_handler(sig, kick_handler).expect("register the vCPU kick handler");
        sig
    })
}

pub struct Watchdog {
    deadline: Instant,
    fired: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching the calling thread (the vCPU thread).
    pub fn start(budget: Duration) -> Self {
        let sig = kick_signal();
        let deadline = Instant::now() + budget;
        let fired = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<()>();
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let f = fired.clone();
        let thread = std::thread::spawn(move || {
            let mut wait = budget;
            loop {
                match rx.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {
                        f.store(true, Ordering::SeqCst);
                        // SAFETY: the target thread is alive: it joins us before it goes on.
                        unsafe { libc::pthread_kill(target, sig) };
                        wait = Duration::from_millis(2);
                    }
                    _ => return,
                }
            }
        });
        Watchdog {
            deadline,
            fired,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Whether the budget is used up.
    pub fn expired(&self) -> bool {
        self.fired.load(Ordering::SeqCst) || Instant::now() >= self.deadline
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
