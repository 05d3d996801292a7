
pub mod containerd;
