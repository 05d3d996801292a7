//! Seeding the guest RNG with entropy from the host.
//!
//! A fresh VM has almost no entropy sources, and getrandom(2) blocks until
//! the pool is initialised. The host sends a random seed over vsock
//! (SeedRandom) right after connecting, before any container exists; not on
//! the kernel command line, which every container can read. RNDADDENTROPY
//! both mixes it in and credits it, which plain writes to /dev/urandom
//! would not.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// Bytes we credit at most: the kernel's pool is 256 bits; more is harmless
/// but pointless, and keeps a bogus huge value from allocating much.
pub const MAX_SEED: usize = 512;

/// `_IOW('R', 0x03, int[2])` from include/uapi/linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open /dev/urandom")]
    Open(#[source] std::io::Error),
    #[error("RNDADDENTROPY on /dev/urandom failed")]
    Ioctl(#[source] std::io::Error),
    #[error("RNDRESEEDCRNG on /dev/urandom failed")]
    Reseed(#[source] std::io::Error),
}

/// Mixes `seed` into the kernel pool, credits it as entropy, and reseeds
/// the CRNG from the pool at once. Returns the number of bytes credited.
///
/// The reseed makes a VM restored from a template its own at once: clones
/// resume with the template's CRNG state, which adding entropy alone
/// replaces only at the kernel's next time-based reseed (1 s to a minute
/// after the last one, growing with uptime), so two clones could draw the
/// same numbers meanwhile (docs/design/0004-vm-templates.md).
pub fn credit_seed(seed: &[u8]) -> Result<usize, RngError> {
    let seed = &seed[..seed.len().min(MAX_SEED)];
    let buf = rand_pool_info(seed);
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(RngError::Open)?;
    // SAFETY: `buf` is a complete `struct rand_pool_info` (two ints then
    // `buf_size` bytes) that lives across the call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, buf.as_ptr()) };
    if rc != 0 {
        return Err(RngError::Ioctl(std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // ENODATA: the CRNG is not ready yet, so its first seeding, which
        // the credit above triggers, is still to come from this pool.
        if e.raw_os_error() != Some(libc::ENODATA) {
            return Err(RngError::Reseed(e));
        }
    }
    Ok(seed.len())
}

/// Whether the kernel's CRNG is initialised: getrandom(2) with
/// GRND_NONBLOCK fails with EAGAIN until then.
pub fn crng_ready() -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: the kernel writes at most one byte into `byte`, which lives
    // across the call.
    let n = unsafe { libc::getrandom(byte.as_mut_ptr().cast(), 1, libc::GRND_NONBLOCK) };
    n == 1
}

/// The kernel's entropy estimate in bits (`entropy_avail`).
pub fn entropy_avail() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/random/entropy_avail")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Lays out `struct rand_pool_info { int entropy_count; int buf_size;
/// __u32 buf[]; }` in native byte order; `entropy_count` is in bits.
/// Built from u32 words so the buffer is aligned for the header ints.
fn rand_pool_info(seed: &[u8]) -> Vec<u32> {
    let bits = i32::try_from(seed.len() * 8).unwrap_or(i32::MAX);
    let len = i32::try_from(seed.len()).unwrap_or(i32::MAX);
    let mut words = vec![bits as u32, len as u32];
    words.extend(seed.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_ne_bytes(w)
    }));
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_layout() {
        let buf = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(buf[0], 40);
        assert_eq!(buf[1], 5);
        assert_eq!(buf[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(buf[3], u32::from_ne_bytes([5, 0, 0, 0]));
    }
}
