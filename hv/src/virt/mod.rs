//! virt
pub mod stage2;
pub mod svm;
pub mod vcpu;
pub mod vmx;
