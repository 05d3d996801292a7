//! A minimal vhost-user-fs frontend: it connects to a virtiofsd socket the
//! way a VMM does and then behaves as a guest whose kernel sends whatever
//! FUSE requests it likes.
//!
//! ```no_run
//! # use clh_tests::fuse_frontend::{FuseFrontend, Creds, ROOT_ID};
//! # fn f(socket: &std::path::Path) -> anyhow::Result<()> {
//! let mut fs = FuseFrontend::connect(socket, std::time::Duration::from_secs(10))?;
//! let up = fs.lookup(ROOT_ID, b"..")?; // Ok(Entry) or Err(Errno)
//! let made = fs.symlink(ROOT_ID, b"/etc/evil", b"x", Creds::ROOT)?;
//! # Ok(()) }
//! ```
//!
//! Transport problems (socket, guest memory, no reply by the deadline) are
//! the outer `anyhow::Result`; what virtiofsd answered is the inner
//! [`Answer`], so a test asserts on the errno itself.

mod abi;
mod fixture;
pub(crate) mod vring;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use nix::errno::Errno;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Address, GuestAddress};

pub use abi::{Attr, Creds, Entry, Opcode, ROOT_ID};
use abi::{Body, Fields};
pub use fixture::{host_ino, tree, Fixture, REPLY_TIMEOUT};
use vring::{connect_vhost_user, start_vring, Buffer, GuestRam, SplitQueue};

/// What virtiofsd answered: a reply body, or the errno it refused with.
pub type Answer<T> = Result<T, Errno>;

/// virtio-fs queues: 0 is hiprio (FORGET, INTERRUPT), 1.. are request
/// queues; one request queue is enough for one request at a time.
const HIPRIO: usize = 0;
const REQUESTS: usize = 1;
const QUEUE_SIZE: u16 = 16;

// Guest physical layout: two rings, then one request and one reply buffer.
const HIPRIO_RINGS: GuestAddress = GuestAddress(0x0000);
const REQUEST_RINGS: GuestAddress = GuestAddress(0x4000);
const IN_BUF: GuestAddress = GuestAddress(0x1_0000);
const OUT_BUF: GuestAddress = GuestAddress(0x2_0000);
const BUF_LEN: u32 = 0x1_0000;
const RAM_SIZE: usize = 0x4_0000;

/// A connected vhost-user-fs frontend that has done FUSE_INIT.
pub struct FuseFrontend {
    // Only held: the session lives as long as the socket. Field order is
    // drop order: the socket closes (virtiofsd then exits) before the guest
    // RAM it has mapped is unmapped here.
    _vhost: Frontend,
    // Never used for a request, but a virtio-fs device has it and a VMM
    // sets it up: owned for the session like the request queue.
    _hiprio: SplitQueue,
    requests: SplitQueue,
    ram: GuestRam,
    unique: u64,
    timeout: Duration,
}

impl FuseFrontend {
    /// Connects to a listening virtiofsd, sets up guest memory and the
    /// hiprio and one request queue, and sends FUSE_INIT. `timeout` bounds
    /// every vhost-user reply and every FUSE reply.
    pub fn connect(socket: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let (mut vhost, wanted) = connect_vhost_user(socket, timeout, 2, "virtiofsd")?;

        let protocol = vhost
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        ensure!(
            protocol.contains(VhostUserProtocolFeatures::REPLY_ACK),
            "virtiofsd lacks REPLY_ACK ({protocol:?})"
        );
        vhost
            .set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
            .context("SET_PROTOCOL_FEATURES")?;
        // Every later message waits for virtiofsd's ack, so the rings are
        // live before the first kick instead of racing their setup.
        vhost.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        vhost.set_features(wanted).context("SET_FEATURES")?;

        let ram = GuestRam::new(RAM_SIZE)?;
        vhost
            .set_mem_table(&ram.regions()?)
            .context("SET_MEM_TABLE")?;
        let hiprio = SplitQueue::new(&ram, HIPRIO_RINGS, QUEUE_SIZE)?;
        let requests = SplitQueue::new(&ram, REQUEST_RINGS, QUEUE_SIZE)?;
        for (index, queue) in [(HIPRIO, &hiprio), (REQUESTS, &requests)] {
            start_vring(&mut vhost, &ram, index, queue)?;
        }

        let mut fs = Self {
            _vhost: vhost,
            _hiprio: hiprio,
            requests,
            ram,
            unique: 0,
            timeout,
        };
        fs.init()?;
        Ok(fs)
    }

    /// FUSE_INIT with no capability flags: the plainest session a guest can
    /// ask for.
    fn init(&mut self) -> anyhow::Result<()> {
        let body = Body::new()
            .u32(abi::KERNEL_VERSION)
            .u32(abi::KERNEL_MINOR_VERSION)
            .u32(0) // max_readahead
            .u32(0) // flags
            .into_bytes();
        let reply = self
            .call(Opcode::Init, 0, Creds::ROOT, &body)?
            .map_err(|e| anyhow::anyhow!("FUSE_INIT refused: {e}"))?;
        let mut f = Fields::new(&reply, "FUSE_INIT");
        let major = f.u32()?;
        ensure!(
            major == abi::KERNEL_VERSION,
            "virtiofsd speaks FUSE {major}"
        );
        Ok(())
    }

    /// Sends one raw request on the request queue and waits (bounded) for
    /// its reply: the body after `fuse_out_header`, or the errno.
    pub fn call(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        creds: Creds,
        body: &[u8],
    ) -> anyhow::Result<Answer<Vec<u8>>> {
        self.unique += 1;
        let header = abi::in_header(opcode, self.unique, nodeid, creds, body.len());
        let in_len = u32::try_from(header.len() + body.len())?;
        ensure!(
            in_len <= BUF_LEN,
            "{opcode:?} request of {in_len} bytes is too big"
        );
        self.ram.write(&header, IN_BUF)?;
        self.ram
            .write(body, IN_BUF.unchecked_add(header.len() as u64))?;
        // Stale bytes from an earlier reply must not pass for this one.
        self.ram.write(&vec![0; BUF_LEN as usize], OUT_BUF)?;
        let chain = [
            Buffer {
                addr: IN_BUF,
                len: in_len,
                writable: false,
            },
            Buffer {
                addr: OUT_BUF,
                len: BUF_LEN,
                writable: true,
            },
        ];
        self.requests.submit(&self.ram, &chain)?;
        let written = self
            .requests
            .wait_used(&self.ram, Instant::now() + self.timeout)
            .with_context(|| format!("no reply to {opcode:?} within {:?}", self.timeout))?;

        let mut out = vec![0; written as usize];
        self.ram.read(&mut out, OUT_BUF)?;
        let mut f = Fields::new(&out, "fuse_out_header");
        let len = f.u32()? as usize;
        let error = f.u32()? as i32;
        let unique = f.u64()?;
        ensure!(
            unique == self.unique,
            "reply {unique} to request {}",
            self.unique
        );
        ensure!(
            (abi::OUT_HEADER_LEN..=out.len()).contains(&len),
            "{opcode:?} reply claims {len} bytes, {} written",
            out.len()
        );
        if error != 0 {
            return Ok(Err(Errno::from_raw(-error)));
        }
        Ok(Ok(out[abi::OUT_HEADER_LEN..len].to_vec()))
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> anyhow::Result<Answer<Entry>> {
        let body = Body::new().name(name).into_bytes();
        self.entry_call(Opcode::Lookup, parent, Creds::ROOT, &body)
    }

    /// SYMLINK: a new entry `name` in `parent` pointing at `target`.
    pub fn symlink(
        &mut self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        creds: Creds,
    ) -> anyhow::Result<Answer<Entry>> {
        let body = Body::new().name(name).name(target).into_bytes();
        self.entry_call(Opcode::Symlink, parent, creds, &body)
    }

    /// MKNOD with `mode` (type and permission bits) and `rdev`.
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        creds: Creds,
    ) -> anyhow::Result<Answer<Entry>> {
        let body = Body::new().u32(mode).u32(rdev).u32(0).u32(0).name(name);
        self.entry_call(Opcode::Mknod, parent, creds, &body.into_bytes())
    }

    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        creds: Creds,
    ) -> anyhow::Result<Answer<Entry>> {
        // fuse_mkdir_in: mode, umask (0: keep every bit the guest asks for).
        let body = Body::new().u32(mode).u32(0).name(name).into_bytes();
        self.entry_call(Opcode::Mkdir, parent, creds, &body)
    }

    /// CREATE (open with O_CREAT): the new entry and its open file handle.
    pub fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        creds: Creds,
    ) -> anyhow::Result<Answer<(Entry, u64)>> {
        // fuse_create_in: flags, mode, umask, open_flags.
        let body = Body::new()
            .u32(flags as u32)
            .u32(mode)
            .u32(0)
            .u32(0)
            .name(name);
        let answer = self.call(Opcode::Create, parent, creds, &body.into_bytes())?;
        decoded(answer, "CREATE", |f| {
            Ok((Entry::decode(f)?, abi::decode_open_out(f)?))
        })
    }

    /// OPEN of `nodeid` with open(2) `flags`: the file handle.
    pub fn open(&mut self, nodeid: u64, flags: i32) -> anyhow::Result<Answer<u64>> {
        // fuse_open_in: flags, open_flags.
        let body = Body::new().u32(flags as u32).u32(0).into_bytes();
        let answer = self.call(Opcode::Open, nodeid, Creds::ROOT, &body)?;
        decoded(answer, "OPEN", abi::decode_open_out)
    }

    pub fn release(&mut self, nodeid: u64, fh: u64) -> anyhow::Result<Answer<()>> {
        // fuse_release_in: fh, flags, release_flags, lock_owner.
        let body = Body::new().u64(fh).u32(0).u32(0).u64(0).into_bytes();
        Ok(self
            .call(Opcode::Release, nodeid, Creds::ROOT, &body)?
            .map(drop))
    }

    /// UNLINK of the non-directory `name` in `parent`.
    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> anyhow::Result<Answer<()>> {
        let body = Body::new().name(name).into_bytes();
        Ok(self
            .call(Opcode::Unlink, parent, Creds::ROOT, &body)?
            .map(drop))
    }

    /// RMDIR of the directory `name` in `parent`.
    pub fn rmdir(&mut self, parent: u64, name: &[u8]) -> anyhow::Result<Answer<()>> {
        let body = Body::new().name(name).into_bytes();
        Ok(self
            .call(Opcode::Rmdir, parent, Creds::ROOT, &body)?
            .map(drop))
    }

    /// RENAME of `name` in `parent` to `new_name` in `new_parent`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
    ) -> anyhow::Result<Answer<()>> {
        // fuse_rename_in: newdir; then both names.
        let body = Body::new().u64(new_parent).name(name).name(new_name);
        Ok(self
            .call(Opcode::Rename, parent, Creds::ROOT, &body.into_bytes())?
            .map(drop))
    }

    /// LINK: a new name `name` in `parent` for the existing node `old`.
    pub fn link(&mut self, old: u64, parent: u64, name: &[u8]) -> anyhow::Result<Answer<Entry>> {
        let body = Body::new().u64(old).name(name).into_bytes();
        self.entry_call(Opcode::Link, parent, Creds::ROOT, &body)
    }

    pub fn getattr(&mut self, nodeid: u64) -> anyhow::Result<Answer<Attr>> {
        // fuse_getattr_in: getattr_flags, dummy, fh.
        let body = Body::new().u32(0).u32(0).u64(0).into_bytes();
        let answer = self.call(Opcode::Getattr, nodeid, Creds::ROOT, &body)?;
        decoded(answer, "GETATTR", abi::decode_attr_out)
    }

    /// SETATTR of the mode only: chmod, e.g. the second half of a guest's
    /// `mkdir -m 3777` (mkdir(2) itself drops S_ISGID from the mode).
    pub fn chmod(&mut self, nodeid: u64, mode: u32, creds: Creds) -> anyhow::Result<Answer<Attr>> {
        // fuse_setattr_in: valid, padding, fh, size, lock_owner, atime,
        // mtime, ctime, atimensec, mtimensec, ctimensec, mode, unused4, uid,
        // gid, unused5.
        let mut body = Body::new().u32(abi::FATTR_MODE).u32(0);
        for _ in 0..6 {
            body = body.u64(0);
        }
        let body = body
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(mode)
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(0);
        let answer = self.call(Opcode::Setattr, nodeid, creds, &body.into_bytes())?;
        decoded(answer, "SETATTR", abi::decode_attr_out)
    }

    pub fn readlink(&mut self, nodeid: u64) -> anyhow::Result<Answer<Vec<u8>>> {
        self.call(Opcode::Readlink, nodeid, Creds::ROOT, &[])
    }

    fn entry_call(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        creds: Creds,
        body: &[u8],
    ) -> anyhow::Result<Answer<Entry>> {
        let answer = self.call(opcode, nodeid, creds, body)?;
        decoded(answer, "entry", Entry::decode)
    }
}

/// Decodes a successful reply with `decode`; an errno passes through.
fn decoded<T>(
    answer: Answer<Vec<u8>>,
    what: &'static str,
    decode: impl FnOnce(&mut Fields<'_>) -> anyhow::Result<T>,
) -> anyhow::Result<Answer<T>> {
    match answer {
        Ok(reply) => Ok(Ok(decode(&mut Fields::new(&reply, what))?)),
        Err(errno) => Ok(Err(errno)),
    }
}
