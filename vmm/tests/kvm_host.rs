//! Checks on the host's KVM that everything else relies on.

use kvm_ioctls::{Cap, Kvm};

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_offers_what_the_harness_needs() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    assert_eq!(kvm.get_api_version(), 12, "KVM API version");
    // Traced pmem regions are read-only slots whose stores exit to the VMM.
    assert!(
        kvm.check_extension(Cap::ReadonlyMem),
        "KVM_CAP_READONLY_MEM"
    );
    assert!(kvm.check_extension(Cap::UserMemory), "KVM_CAP_USER_MEMORY");
    let vm = kvm.create_vm().expect("create a VM");
    vm.create_vcpu(0).expect("create a vCPU");
}
