//! An async HTTP/1.1 client for the Cloud Hypervisor API socket.
//!
//! One connection per request: CH's HTTP server (micro_http) is single
//! threaded and serves one request at a time anyway, and a fresh connection
//! means a request abandoned at its deadline can never leave a half-read
//! response behind for the next one. Calls are still serialized through one
//! async mutex so that a slow call (a boot, a hot-plug) is not raced by
//! others that would only queue up inside CH and hit their own deadlines.
//!
//! Every call has a deadline that covers waiting for the mutex, connecting,
//! and reading the whole response.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::api::{
    DiskConfig, FsConfig, NetConfig, PciDeviceInfo, RestoreConfig, VmConfig, VmCounters, VmInfo,
    VmResize, VmSnapshotConfig, VmmPingResponse, VsockConfig,
};
use crate::{Error, Result};

/// One API endpoint: its name (as in the spec's path, and in our errors)
/// and its HTTP method.
#[derive(Debug, Clone, Copy)]
struct Endpoint {
    name: &'static str,
    /// `hyper::Method` is not `Copy`; the spec only uses these two.
    put: bool,
}

const fn get(name: &'static str) -> Endpoint {
    Endpoint { name, put: false }
}

const fn put(name: &'static str) -> Endpoint {
    Endpoint { name, put: true }
}

impl Endpoint {
    fn method(self) -> Method {
        if self.put {
            Method::PUT
        } else {
            Method::GET
        }
    }
}

// Methods as the v53 spec declares them.
const VMM_PING: Endpoint = get("vmm.ping");
const VMM_SHUTDOWN: Endpoint = put("vmm.shutdown");
const VM_CREATE: Endpoint = put("vm.create");
const VM_BOOT: Endpoint = put("vm.boot");
const VM_INFO: Endpoint = get("vm.info");
const VM_COUNTERS: Endpoint = get("vm.counters");
const VM_ADD_FS: Endpoint = put("vm.add-fs");
const VM_ADD_NET: Endpoint = put("vm.add-net");
const VM_ADD_DISK: Endpoint = put("vm.add-disk");
const VM_RESIZE: Endpoint = put("vm.resize");
const VM_SHUTDOWN: Endpoint = put("vm.shutdown");
const VM_PAUSE: Endpoint = put("vm.pause");
const VM_RESUME: Endpoint = put("vm.resume");
const VM_SNAPSHOT: Endpoint = put("vm.snapshot");
const VM_RESTORE: Endpoint = put("vm.restore");
const VM_ADD_VSOCK: Endpoint = put("vm.add-vsock");

/// Client of one CH process's API socket.
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
    /// Serializes calls; see the module doc.
    lock: Mutex<()>,
}

impl ApiClient {
    /// `timeout` bounds each call unless the call is given its own deadline.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
            lock: Mutex::new(()),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `vmm.ping`: the VMM's version and features.
    pub async fn ping(&self) -> Result<VmmPingResponse> {
        self.ping_within(self.timeout).await
    }

    pub(crate) async fn ping_within(&self, timeout: Duration) -> Result<VmmPingResponse> {
        let body = self.call(VMM_PING, None, timeout).await?;
        decode(VMM_PING, &body)
    }

    /// `vm.create`: creates (does not boot) the VM.
    pub async fn create(&self, config: &VmConfig) -> Result<()> {
        self.create_within(config, self.timeout).await
    }

    pub(crate) async fn create_within(&self, config: &VmConfig, timeout: Duration) -> Result<()> {
        let body = encode(VM_CREATE, config)?;
        self.call(VM_CREATE, Some(body), timeout).await.map(drop)
    }

    /// `vm.boot`: boots the created VM.
    pub async fn boot(&self) -> Result<()> {
        self.boot_within(self.timeout).await
    }

    pub(crate) async fn boot_within(&self, timeout: Duration) -> Result<()> {
        self.call(VM_BOOT, None, timeout).await.map(drop)
    }

    /// `vm.info`: state and effective configuration.
    pub async fn info(&self) -> Result<VmInfo> {
        let body = self.call(VM_INFO, None, self.timeout).await?;
        decode(VM_INFO, &body)
    }

    /// `vm.counters`: per-device counters.
    pub async fn counters(&self) -> Result<VmCounters> {
        let body = self.call(VM_COUNTERS, None, self.timeout).await?;
        decode(VM_COUNTERS, &body)
    }

    /// `vm.add-fs`. Returns the PCI device on a hot-plug, `None` when CH
    /// cold-added it to a VM not yet booted (HTTP 204).
    pub async fn add_fs(&self, fs: &FsConfig) -> Result<Option<PciDeviceInfo>> {
        self.add_device(VM_ADD_FS, fs).await
    }

    /// `vm.add-net`; see [`ApiClient::add_fs`] for the result.
    pub async fn add_net(&self, net: &NetConfig) -> Result<Option<PciDeviceInfo>> {
        self.add_device(VM_ADD_NET, net).await
    }

    /// `vm.add-disk`; see [`ApiClient::add_fs`] for the result.
    pub async fn add_disk(&self, disk: &DiskConfig) -> Result<Option<PciDeviceInfo>> {
        self.add_device(VM_ADD_DISK, disk).await
    }

    /// `vm.resize`.
    pub async fn resize(&self, resize: &VmResize) -> Result<()> {
        let body = encode(VM_RESIZE, resize)?;
        self.call(VM_RESIZE, Some(body), self.timeout)
            .await
            .map(drop)
    }

    /// `vm.add-vsock`; see [`ApiClient::add_fs`] for the result. CH takes
    /// one vsock device per VM.
    pub async fn add_vsock(&self, vsock: &VsockConfig) -> Result<Option<PciDeviceInfo>> {
        self.add_device(VM_ADD_VSOCK, vsock).await
    }

    /// `vm.pause`: stops the vCPUs of a booted VM.
    pub async fn pause(&self) -> Result<()> {
        self.call(VM_PAUSE, None, self.timeout).await.map(drop)
    }

    /// `vm.resume`: runs the vCPUs of a paused (or restored) VM again.
    pub async fn resume(&self) -> Result<()> {
        self.call(VM_RESUME, None, self.timeout).await.map(drop)
    }

    /// `vm.snapshot` of the paused VM. Writes all of guest RAM, so the
    /// caller gives the deadline.
    pub async fn snapshot(&self, snapshot: &VmSnapshotConfig, timeout: Duration) -> Result<()> {
        let body = encode(VM_SNAPSHOT, snapshot)?;
        self.call(VM_SNAPSHOT, Some(body), timeout).await.map(drop)
    }

    /// `vm.restore` into this VMM, which must have no VM yet. Reads the
    /// snapshot's RAM, so the caller gives the deadline.
    pub async fn restore(&self, restore: &RestoreConfig, timeout: Duration) -> Result<()> {
        let body = encode(VM_RESTORE, restore)?;
        self.call(VM_RESTORE, Some(body), timeout).await.map(drop)
    }

    /// `vm.shutdown`: stops the guest; the VMM keeps running.
    pub async fn shutdown_vm(&self, timeout: Duration) -> Result<()> {
        self.call(VM_SHUTDOWN, None, timeout).await.map(drop)
    }

    /// `vmm.shutdown`: the VMM process exits after answering.
    pub async fn shutdown_vmm(&self, timeout: Duration) -> Result<()> {
        self.call(VMM_SHUTDOWN, None, timeout).await.map(drop)
    }

    async fn add_device<T: Serialize>(
        &self,
        endpoint: Endpoint,
        device: &T,
    ) -> Result<Option<PciDeviceInfo>> {
        let body = encode(endpoint, device)?;
        let response = self.call(endpoint, Some(body), self.timeout).await?;
        if response.is_empty() {
            return Ok(None);
        }
        decode(endpoint, &response).map(Some)
    }

    /// Sends one request; returns the body of a 2xx response.
    async fn call(
        &self,
        endpoint: Endpoint,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes> {
        let exchange = async {
            let _serialized = self.lock.lock().await;
            self.exchange(endpoint, body).await
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout {
                what: format!(
                    "Cloud Hypervisor API {} to answer on {}",
                    endpoint.name,
                    self.socket.display()
                ),
                timeout,
            })?
    }

    async fn exchange(&self, endpoint: Endpoint, body: Option<Bytes>) -> Result<Bytes> {
        let transport = |source: Box<dyn std::error::Error + Send + Sync>| Error::ApiTransport {
            endpoint: endpoint.name,
            source,
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| transport(e.into()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(e.into()))?;
        // The connection future does the actual I/O; it runs beside this
        // call and is aborted with it (deadline or not), so nothing outlives
        // the request.
        let connection = AbortOnDrop(tokio::spawn(connection));

        let has_body = body.is_some();
        let request = Request::builder()
            .method(endpoint.method())
            .uri(format!("/api/v1/{}", endpoint.name))
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        let request = if has_body {
            request.header(hyper::header::CONTENT_TYPE, "application/json")
        } else {
            request
        };
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| transport(e.into()))?;

        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transport(e.into()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.into()))?
            .to_bytes();
        drop(connection);

        if status.is_success() {
            Ok(body)
        } else {
            Err(Error::Api {
                endpoint: endpoint.name,
                status: status.as_u16(),
                body: ch_error_text(status, &body),
            })
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn encode<T: Serialize>(endpoint: Endpoint, value: &T) -> Result<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|source| Error::ApiEncode {
            endpoint: endpoint.name,
            source,
        })
}

fn decode<T: DeserializeOwned>(endpoint: Endpoint, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|source| Error::ApiDecode {
        endpoint: endpoint.name,
        source,
    })
}

/// CH's explanation of a failure. CH answers errors with a JSON array of the
/// error chain's messages (outermost first); older versions and proxies
/// send plain text. Falls back to the status' reason when the body is empty.
pub(crate) fn ch_error_text(status: StatusCode, body: &[u8]) -> String {
    if let Ok(chain) = serde_json::from_slice::<Vec<String>>(body) {
        if !chain.is_empty() {
            return chain.join(": ");
        }
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no error text")
            .to_string()
    } else {
        text
    }
}
