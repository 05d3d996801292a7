//! Cloud Hypervisor backend (filled in by the CH work).
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, Hypervisor, Result, VmSpec};

pub struct CloudHypervisor {
    binary: PathBuf,
}

impl CloudHypervisor {
    pub fn new(binary: PathBuf) -> Self {
        Self { binary }
    }
}

#[async_trait]
impl Hypervisor for CloudHypervisor {
    async fn start(&mut self, _spec: &VmSpec) -> Result<()> {
        let _ = &self.binary;
        Err(Error::Unsupported("start"))
    }
    fn vsock_socket(&self) -> PathBuf {
        PathBuf::new()
    }
    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
    async fn wait_exit(&self) -> String {
        String::new()
    }
    async fn stop(&mut self, _timeout: Duration) -> Result<()> {
        Ok(())
    }
}
