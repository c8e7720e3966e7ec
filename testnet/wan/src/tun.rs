//! Opening a TUN device: the one `ioctl` (TUNSETIFF) that needs `unsafe`.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)` from `<linux/if_tun.h>`.
const TUNSETIFF: u64 = 0x4004_54ca;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
/// `sizeof(struct ifreq)` on 64-bit Linux.
const IFREQ_SIZE: usize = 40;
/// `IFNAMSIZ` including the terminating NUL.
const IFNAMSIZ: usize = 16;

/// Creates a layer-3 TUN interface `name` (no packet-information header) in the calling
/// thread's network namespace and returns its non-blocking file descriptor. The interface
/// lives as long as the returned file is open.
pub(crate) fn open_tun(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= IFNAMSIZ || !name.is_ascii() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut ifr = [0u8; IFREQ_SIZE];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[IFNAMSIZ..IFNAMSIZ + 2].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: `file` is an open /dev/net/tun descriptor and `ifr` is a writable buffer of
    // sizeof(struct ifreq) bytes with a NUL-terminated name and the flags at the offset of
    // `ifr_flags`; the kernel reads and writes only within it during the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}
