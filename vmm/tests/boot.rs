//! Boots the guest kernel under KVM.

mod common;

use common::*;
use vmm::Outcome;

#[test]
#[ignore = "needs /dev/kvm"]
fn guest_boots_and_exits_with_success() {
    let img = Images::new();
    let r = vmm::run(img.config("")).expect("the VMM runs");
    assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", describe(&r));
    assert!(r.protocol_errors.is_empty(), "{}", describe(&r));
    assert!(r.stats.setup_ns > 0 && r.stats.total_ns >= r.stats.setup_ns);
    eprintln!(
        "setup {} µs, boot-to-exit {} µs, {} exits",
        r.stats.setup_ns / 1000,
        r.stats.total_ns / 1000,
        r.stats.exits
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn guest_runs_with_the_in_kernel_irqchip_and_irqfds() {
    let img = Images::new();
    let mut c = img.config("harness.test=blk-write:1:7;blk-flush;pmem-flush");
    c.interrupts = true;
    let r = vmm::run(c).expect("the VMM runs");
    assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", describe(&r));
}
