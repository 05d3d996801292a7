//! A minimal vhost-user-vsock frontend: drives vhost-device-vsock the way
//! QEMU does when the guest's vsock driver starts the device (features,
//! guest memory, then the RX and TX rings), one step at a time, so that a
//! test can make a host connection at any point of that start.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::GuestAddress;

use crate::fuse_frontend::vring::{connect_vhost_user, start_vring, Buffer, GuestRam, SplitQueue};

/// virtio-vsock queues the device serves: 0 is RX (device to guest), 1 is
/// TX; the event queue stays in the VMM.
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 16;

// Guest physical layout: the two rings, then one RX buffer.
const RX_RINGS: GuestAddress = GuestAddress(0x0000);
const TX_RINGS: GuestAddress = GuestAddress(0x4000);
const RX_BUF: GuestAddress = GuestAddress(0x1_0000);
const RX_BUF_LEN: u32 = 0x1000;
const TX_BUF: GuestAddress = GuestAddress(0x1_8000);
const RAM_SIZE: usize = 0x2_0000;

/// `struct virtio_vsock_hdr`: le64 src_cid, le64 dst_cid, le32 src_port,
/// le32 dst_port, le32 len, le16 type, le16 op, le32 flags, le32
/// buf_alloc, le32 fwd_cnt: 44 bytes.
const HDR_LEN: usize = 44;
pub const VSOCK_OP_REQUEST: u16 = 1;
pub const VSOCK_OP_RESPONSE: u16 = 2;
const VSOCK_TYPE_STREAM: u16 = 1;
const HOST_CID: u64 = 2;
/// The guest CID the tests give the device.
pub const GUEST_CID: u64 = 3;

/// The header fields of a packet from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub op: u16,
    pub src_port: u32,
    pub dst_port: u32,
}

/// A connected frontend; the rings exist once [`VsockFrontend::start_rings`]
/// has run.
pub struct VsockFrontend {
    // Field order is drop order: the session closes before the RAM the
    // device has mapped is unmapped here.
    vhost: Frontend,
    rings: Option<(SplitQueue, SplitQueue)>,
    ram: GuestRam,
}

impl VsockFrontend {
    /// Connects to vhost-device-vsock's vhost-user socket, negotiates
    /// features and announces the guest memory: the device is then where
    /// QEMU leaves it between SET_MEM_TABLE and the rings' setup.
    pub fn connect_with_memory(socket: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let (mut vhost, wanted) = connect_vhost_user(socket, timeout, 3, "vhost-device-vsock")?;
        vhost.set_features(wanted).context("SET_FEATURES")?;
        vhost
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        vhost
            .set_protocol_features(VhostUserProtocolFeatures::empty())
            .context("SET_PROTOCOL_FEATURES")?;
        let ram = GuestRam::new(RAM_SIZE)?;
        vhost
            .set_mem_table(&ram.regions()?)
            .context("SET_MEM_TABLE")?;
        // vhost-device-vsock has no REPLY_ACK: a request with a reply,
        // handled after the ones before it, says the memory table was taken.
        vhost
            .get_features()
            .context("GET_FEATURES after SET_MEM_TABLE")?;
        Ok(Self {
            vhost,
            rings: None,
            ram,
        })
    }

    /// Sets up and enables the RX and TX rings as QEMU does next, and
    /// offers one RX buffer.
    pub fn start_rings(&mut self) -> anyhow::Result<()> {
        let rx = SplitQueue::new(&self.ram, RX_RINGS, QUEUE_SIZE)?;
        let tx = SplitQueue::new(&self.ram, TX_RINGS, QUEUE_SIZE)?;
        for (index, queue) in [(RX, &rx), (TX, &tx)] {
            start_vring(&mut self.vhost, &self.ram, index, queue)?;
        }
        // As after SET_MEM_TABLE: a reply says the rings are set up in the
        // device (a host connection racing their setup is the bug the
        // tests pin down).
        self.vhost
            .get_features()
            .context("GET_FEATURES after the rings")?;
        let mut rx = rx;
        rx.submit(
            &self.ram,
            &[Buffer {
                addr: RX_BUF,
                len: RX_BUF_LEN,
                writable: true,
            }],
        )?;
        self.rings = Some((rx, tx));
        Ok(())
    }

    /// Waits until `deadline` for the device to put a packet in the RX
    /// buffer.
    pub fn next_rx_packet(&mut self, deadline: Instant) -> anyhow::Result<Packet> {
        let (rx, _) = self.rings.as_mut().context("the rings are not set up")?;
        let written = rx.wait_used(&self.ram, deadline)?;
        ensure!(
            written as usize >= HDR_LEN,
            "a {written}-byte RX packet is shorter than its header"
        );
        let mut hdr = [0u8; HDR_LEN];
        self.ram.read(&mut hdr, RX_BUF)?;
        let le32 = |at: usize| u32::from_le_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]]);
        Ok(Packet {
            op: u16::from_le_bytes([hdr[30], hdr[31]]),
            src_port: le32(16),
            dst_port: le32(20),
        })
    }

    /// Sends the guest's RESPONSE to a connection request from host port
    /// `host_port` to guest port `guest_port`, as a guest whose listener
    /// accepted it.
    pub fn send_response(&mut self, guest_port: u32, host_port: u32) -> anyhow::Result<()> {
        let (_, tx) = self.rings.as_mut().context("the rings are not set up")?;
        let mut hdr = Vec::with_capacity(HDR_LEN);
        hdr.extend_from_slice(&GUEST_CID.to_le_bytes());
        hdr.extend_from_slice(&HOST_CID.to_le_bytes());
        hdr.extend_from_slice(&guest_port.to_le_bytes());
        hdr.extend_from_slice(&host_port.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes()); // len
        hdr.extend_from_slice(&VSOCK_TYPE_STREAM.to_le_bytes());
        hdr.extend_from_slice(&VSOCK_OP_RESPONSE.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes()); // flags
        hdr.extend_from_slice(&(64u32 << 10).to_le_bytes()); // buf_alloc
        hdr.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
        self.ram.write(&hdr, TX_BUF)?;
        tx.submit(
            &self.ram,
            &[Buffer {
                addr: TX_BUF,
                len: HDR_LEN as u32,
                writable: false,
            }],
        )
    }
}
