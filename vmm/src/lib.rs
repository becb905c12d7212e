//! A small KVM virtual machine monitor for the pcache test harness.
