//! The few FUSE message layouts the harness speaks (include/uapi/linux/
//! fuse.h, protocol 7.31), encoded and decoded field by field in little
//! endian. Hand-written rather than `#[repr(C)]` + `ByteValued`: a malicious
//! guest builds messages byte by byte too, and this needs no `unsafe`.

use anyhow::{ensure, Context};

/// The root directory's node id.
pub const ROOT_ID: u64 = 1;

pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 31;

/// `fuse_setattr_in.valid`: the mode field is set.
pub const FATTR_MODE: u32 = 1 << 0;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;

/// Request opcodes (`enum fuse_opcode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Opcode {
    Lookup = 1,
    Getattr = 3,
    Setattr = 4,
    Readlink = 5,
    Symlink = 6,
    Mknod = 8,
    Mkdir = 9,
    Rmdir = 11,
    Rename = 12,
    Link = 13,
    Open = 14,
    Release = 18,
    Init = 26,
    Create = 35,
}

/// The caller a request claims to come from (`fuse_in_header` uid, gid,
/// pid): whatever the guest kernel writes, virtiofsd takes on trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Creds {
    pub const ROOT: Creds = Creds {
        uid: 0,
        gid: 0,
        pid: 1,
    };

    /// An unprivileged guest user.
    pub const fn user(uid: u32, gid: u32) -> Creds {
        Creds { uid, gid, pid: 1 }
    }
}

/// Appends little-endian fields to a message body.
#[derive(Default)]
pub struct Body(Vec<u8>);

impl Body {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A name as FUSE sends it: its bytes and a terminating NUL. Names are
    /// taken as raw bytes so that a test can send what a kernel never would
    /// (`/`, `..` chains).
    pub fn name(mut self, name: &[u8]) -> Self {
        self.0.extend_from_slice(name);
        self.0.push(0);
        self
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// `fuse_in_header` for a request whose body is `body_len` bytes.
pub fn in_header(
    opcode: Opcode,
    unique: u64,
    nodeid: u64,
    creds: Creds,
    body_len: usize,
) -> Vec<u8> {
    let len = u32::try_from(IN_HEADER_LEN + body_len).unwrap_or(u32::MAX);
    let mut h = Body::new()
        .u32(len)
        .u32(opcode as u32)
        .u64(unique)
        .u64(nodeid)
        .u32(creds.uid)
        .u32(creds.gid)
        .u32(creds.pid)
        .into_bytes();
    // total_extlen u16 + padding u16: no request extensions.
    h.extend_from_slice(&[0; 4]);
    h
}

/// Reads little-endian fields from a reply body, failing on truncation.
pub struct Fields<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }
    fn take<const N: usize>(&mut self) -> anyhow::Result<[u8; N]> {
        ensure!(self.buf.len() >= N, "{} reply is truncated", self.what);
        let (head, rest) = self.buf.split_at(N);
        self.buf = rest;
        head.try_into().context("slice length")
    }
    pub fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    pub fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    pub fn skip(&mut self, n: usize) -> anyhow::Result<()> {
        ensure!(self.buf.len() >= n, "{} reply is truncated", self.what);
        self.buf = &self.buf[n..];
        Ok(())
    }
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

/// The parts of `fuse_attr` the tests look at. virtiofsd passes the host
/// `stat` through, so `ino` is the host inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

impl Attr {
    /// Decodes a `fuse_attr` (88 bytes).
    fn decode(f: &mut Fields<'_>) -> anyhow::Result<Self> {
        let ino = f.u64()?;
        let size = f.u64()?;
        // blocks, atime, mtime, ctime; atimensec, mtimensec, ctimensec.
        f.skip(4 * 8 + 3 * 4)?;
        let mode = f.u32()?;
        let nlink = f.u32()?;
        let uid = f.u32()?;
        let gid = f.u32()?;
        let rdev = f.u32()?;
        // blksize, flags.
        f.skip(2 * 4)?;
        Ok(Self {
            ino,
            size,
            mode,
            nlink,
            uid,
            gid,
            rdev,
        })
    }
}

/// `fuse_entry_out`: a node id handed to the guest and its attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub nodeid: u64,
    pub attr: Attr,
}

impl Entry {
    pub fn decode(f: &mut Fields<'_>) -> anyhow::Result<Self> {
        let nodeid = f.u64()?;
        // generation, entry_valid, attr_valid; entry_valid_nsec, attr_valid_nsec.
        f.skip(3 * 8 + 2 * 4)?;
        Ok(Self {
            nodeid,
            attr: Attr::decode(f)?,
        })
    }
}

/// `fuse_attr_out`.
pub fn decode_attr_out(f: &mut Fields<'_>) -> anyhow::Result<Attr> {
    // attr_valid u64, attr_valid_nsec u32, dummy u32.
    f.skip(16)?;
    Attr::decode(f)
}

/// `fuse_open_out`: the file handle.
pub fn decode_open_out(f: &mut Fields<'_>) -> anyhow::Result<u64> {
    let fh = f.u64()?;
    // open_flags, backing_id.
    f.skip(8)?;
    Ok(fh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_header_is_40_bytes_in_kernel_order() {
        let h = in_header(Opcode::Lookup, 7, ROOT_ID, Creds::user(1000, 100), 3);
        assert_eq!(h.len(), IN_HEADER_LEN);
        assert_eq!(&h[0..4], &43u32.to_le_bytes());
        assert_eq!(&h[4..8], &1u32.to_le_bytes());
        assert_eq!(&h[8..16], &7u64.to_le_bytes());
        assert_eq!(&h[16..24], &1u64.to_le_bytes());
        assert_eq!(&h[24..28], &1000u32.to_le_bytes());
        assert_eq!(&h[28..32], &100u32.to_le_bytes());
    }

    #[test]
    fn an_entry_decodes_from_its_128_bytes() {
        let mut raw = vec![0u8; 128];
        raw[0..8].copy_from_slice(&42u64.to_le_bytes());
        // attr starts at 40: ino, then mode at 40 + 60.
        raw[40..48].copy_from_slice(&99u64.to_le_bytes());
        raw[100..104].copy_from_slice(&0o40755u32.to_le_bytes());
        let mut f = Fields::new(&raw, "entry");
        let e = Entry::decode(&mut f).unwrap();
        assert_eq!((e.nodeid, e.attr.ino, e.attr.mode), (42, 99, 0o40755));
        assert!(f.rest().is_empty());
        assert!(Entry::decode(&mut Fields::new(&raw[..100], "entry")).is_err());
    }
}
