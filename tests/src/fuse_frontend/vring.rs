//! The guest side of the virtio transport: memfd-backed guest RAM that the
//! backend maps through SET_MEM_TABLE, and split virtqueues driven the way
//! a guest driver drives them (descriptors, avail ring, kick; used ring,
//! call).
//!
//! One request is in flight per queue at a time, so each request reuses the
//! first descriptors of its queue's table: no free-list to get wrong.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM shared with the backend: one memfd mapped `MAP_SHARED` here
/// and, after SET_MEM_TABLE, in virtiofsd.
pub struct GuestRam {
    mem: GuestMemoryMmap,
}

impl GuestRam {
    /// `size` bytes at guest physical address 0.
    pub fn new(size: usize) -> anyhow::Result<Self> {
        let fd = nix::sys::memfd::memfd_create(
            c"clh-fuse-guest-ram",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .context("memfd_create for guest RAM")?;
        let file = File::from(fd);
        file.set_len(size as u64).context("sizing guest RAM")?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .context("mapping guest RAM")?;
        Ok(Self { mem })
    }

    /// The regions to announce with SET_MEM_TABLE; their fds stay owned by
    /// `self`, which must outlive the message.
    pub fn regions(&self) -> anyhow::Result<Vec<VhostUserMemoryRegionInfo>> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).context("guest RAM region"))
            .collect()
    }

    pub fn write(&self, buf: &[u8], addr: GuestAddress) -> anyhow::Result<()> {
        self.mem
            .write_slice(buf, addr)
            .with_context(|| format!("writing guest RAM at {:#x}", addr.0))
    }

    pub fn read(&self, buf: &mut [u8], addr: GuestAddress) -> anyhow::Result<()> {
        self.mem
            .read_slice(buf, addr)
            .with_context(|| format!("reading guest RAM at {:#x}", addr.0))
    }

    pub fn size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (a reply buffer) rather than device-readable.
    pub writable: bool,
}

/// A split virtqueue, driver side.
pub struct SplitQueue {
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    /// Our copy of avail->idx (the ring's copy is what the device reads).
    next_avail: u16,
    /// How far into the used ring we have consumed.
    next_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
    epoll: Epoll,
}

impl SplitQueue {
    /// A queue of `size` entries whose rings live in the 12 KiB at `base`
    /// (page-aligned parts: descriptor table, avail ring, used ring).
    pub fn new(ram: &GuestRam, base: GuestAddress, size: u16) -> anyhow::Result<Self> {
        ensure!(
            size.is_power_of_two() && size <= 256,
            "bad queue size {size}"
        );
        let queue = Self {
            size,
            desc_table: base,
            avail_ring: base.unchecked_add(0x1000),
            used_ring: base.unchecked_add(0x2000),
            next_avail: 0,
            next_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).context("kick eventfd")?,
            call: EventFd::new(EFD_NONBLOCK).context("call eventfd")?,
            epoll: Epoll::new().context("epoll for the call eventfd")?,
        };
        ensure!(
            queue.used_ring.unchecked_add(0x1000).0 <= ram.size(),
            "queue at {:#x} does not fit in guest RAM",
            base.0
        );
        // A fresh memfd is zeroed, but the rings' flags and indices must be
        // zero whatever the memory held before.
        ram.write(&[0; 0x3000], base)?;
        queue
            .epoll
            .ctl(
                ControlOperation::Add,
                queue.call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .context("watching the call eventfd")?;
        Ok(queue)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// What SET_VRING_ADDR needs. vhost-user ring addresses are frontend
    /// virtual addresses (the backend maps them through the mem table's
    /// `userspace_addr`), unlike descriptor addresses, which are guest
    /// physical.
    pub fn config(&self, ram: &GuestRam) -> anyhow::Result<VringConfigData> {
        let host = |addr: GuestAddress| -> anyhow::Result<u64> {
            let ptr = ram
                .mem
                .get_host_address(addr)
                .with_context(|| format!("ring address {:#x} outside guest RAM", addr.0))?;
            Ok(ptr as u64)
        };
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            // No dirty logging.
            flags: 0,
            desc_table_addr: host(self.desc_table)?,
            used_ring_addr: host(self.used_ring)?,
            avail_ring_addr: host(self.avail_ring)?,
            log_addr: None,
        })
    }

    /// Writes `chain` at the head of the descriptor table, publishes it in
    /// the avail ring and kicks the device.
    pub fn submit(&mut self, ram: &GuestRam, chain: &[Buffer]) -> anyhow::Result<()> {
        ensure!(
            !chain.is_empty() && chain.len() <= usize::from(self.size),
            "a chain of {} buffers does not fit a queue of {}",
            chain.len(),
            self.size
        );
        for (i, buf) in chain.iter().enumerate() {
            let mut flags = if buf.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            let next = if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                (i + 1) as u16
            } else {
                0
            };
            let desc = RawDescriptor::from(Descriptor::new(buf.addr.0, buf.len, flags, next));
            let at = self.desc_table.unchecked_add(16 * i as u64);
            ram.mem
                .write_obj(desc, at)
                .context("writing a descriptor")?;
        }
        // avail ring: flags u16, idx u16, ring[size] u16. Head descriptor 0.
        let slot = self
            .avail_ring
            .unchecked_add(4 + 2 * u64::from(self.next_avail % self.size));
        ram.mem.write_obj(0u16.to_le(), slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptors and the ring slot must be visible to the
        // device before the index that hands them over.
        ram.mem
            .store(
                self.next_avail.to_le(),
                self.avail_ring.unchecked_add(2),
                Ordering::Release,
            )
            .context("publishing avail idx")?;
        self.kick.write(1).context("kicking the queue")?;
        Ok(())
    }

    /// Waits until `deadline` for the device to return the chain; returns
    /// how many bytes it wrote into the writable buffers.
    pub fn wait_used(&mut self, ram: &GuestRam, deadline: Instant) -> anyhow::Result<u32> {
        loop {
            let used_idx: u16 = u16::from_le(
                ram.mem
                    .load(self.used_ring.unchecked_add(2), Ordering::Acquire)
                    .context("reading used idx")?,
            );
            if used_idx != self.next_used {
                let at = self
                    .used_ring
                    .unchecked_add(4 + 8 * u64::from(self.next_used % self.size));
                // struct virtq_used_elem { le32 id; le32 len; }
                let id = u32::from_le(ram.mem.read_obj(at).context("reading a used element")?);
                let len = u32::from_le(ram.mem.read_obj(at.unchecked_add(4))?);
                self.next_used = self.next_used.wrapping_add(1);
                ensure!(id == 0, "device returned descriptor {id}, not 0");
                return Ok(len);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the device did not return the request before the deadline");
            }
            let mut events = [EpollEvent::default()];
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            if self
                .epoll
                .wait(ms, &mut events)
                .context("waiting for call")?
                > 0
            {
                // Drain the counter; EAGAIN (a racing read) is harmless.
                let _ = self.call.read();
            }
        }
    }
}

/// Connects to a vhost-user backend's socket (`device` names it in
/// errors), every reply bounded by `timeout`, takes ownership and checks
/// that it offers VIRTIO_F_VERSION_1 and protocol features; returns the
/// frontend and the features to SET (those two), as QEMU starts a device.
pub(crate) fn connect_vhost_user(
    socket: &std::path::Path,
    timeout: std::time::Duration,
    max_queues: u64,
    device: &str,
) -> anyhow::Result<(vhost::vhost_user::Frontend, u64)> {
    use vhost::vhost_user::message::VhostUserVirtioFeatures;
    use vhost::VhostBackend;
    use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let vhost = vhost::vhost_user::Frontend::from_stream(stream, max_queues);
    vhost.set_owner().context("SET_OWNER")?;
    let offered = vhost.get_features().context("GET_FEATURES")?;
    let wanted = (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    ensure!(
        offered & wanted == wanted,
        "{device} offers features {offered:#x}, lacking {:#x}",
        wanted & !offered
    );
    Ok((vhost, wanted))
}

/// Sets up and enables ring `index` of `vhost` on `queue` in `ram`, with
/// the messages and in the order QEMU sends them.
pub(crate) fn start_vring(
    vhost: &mut vhost::vhost_user::Frontend,
    ram: &GuestRam,
    index: usize,
    queue: &SplitQueue,
) -> anyhow::Result<()> {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;
    let step = |what: &str| format!("{what} for queue {index}");
    vhost
        .set_vring_num(index, queue.size())
        .with_context(|| step("SET_VRING_NUM"))?;
    vhost
        .set_vring_addr(index, &queue.config(ram)?)
        .with_context(|| step("SET_VRING_ADDR"))?;
    vhost
        .set_vring_base(index, 0)
        .with_context(|| step("SET_VRING_BASE"))?;
    vhost
        .set_vring_call(index, &queue.call)
        .with_context(|| step("SET_VRING_CALL"))?;
    vhost
        .set_vring_kick(index, &queue.kick)
        .with_context(|| step("SET_VRING_KICK"))?;
    vhost
        .set_vring_enable(index, true)
        .with_context(|| step("SET_VRING_ENABLE"))?;
    Ok(())
}
