//! Reading another process's memory: the one place pymem does, with typed
//! reads and bounded lengths, so that no length read from the target turns
//! into an unbounded allocation.
use std::{fmt, fs::File, io, os::unix::fs::FileExt as _};

/// The most one read returns; type-specific bounds ([`ProcessMemory::length`])
/// are tighter.
pub const MAX_READ: usize = 1 << 20;

/// A read of process memory that did not happen.
#[derive(Debug)]
pub enum ReadError {
    /// The range is not mapped or not readable.
    Unreadable {
        addr: u64,
        len: usize,
        cause: io::Error,
    },
    /// A length above the bound the caller (or [`MAX_READ`]) allows.
    TooLong { addr: u64, len: u64, max: usize },
    /// No NUL within the bytes a C string may have.
    Unterminated { addr: u64, max: usize },
}

impl ReadError {
    /// Why, without where.
    pub fn reason(&self) -> String {
        match self {
            Self::Unreadable { cause, .. } => cause.to_string(),
            Self::TooLong { len, max, .. } => format!("implausible length {len} (above {max})"),
            Self::Unterminated { max, .. } => format!("no NUL within {max} bytes"),
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = self.reason();
        match self {
            Self::Unreadable { addr, len, .. } => {
                write!(f, "reading {len} bytes at {addr:#x}: {reason}")
            }
            Self::TooLong { addr, .. } | Self::Unterminated { addr, .. } => {
                write!(f, "at {addr:#x}: {reason}")
            }
        }
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreadable { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// Another process's address space, through `/proc/PID/mem`.
pub struct ProcessMemory {
    mem: File,
    pid: u32,
}

/// Bytes one `process_vm_readv` of a bulk read asks for.
const BULK_CHUNK: usize = 8 << 20;
const PAGE: u64 = 4096;

impl ProcessMemory {
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(Self {
            mem: File::open(format!("/proc/{pid}/mem"))?,
            pid,
        })
    }

    /// Fills `buf` from `addr` in big `process_vm_readv` chunks; pages that
    /// cannot be read are left zeroed and skipped. Returns the bytes read.
    pub fn read_into(&self, addr: u64, buf: &mut [u8]) -> usize {
        let mut done = 0usize;
        let mut read = 0usize;
        while done < buf.len() {
            let want = (buf.len() - done).min(BULK_CHUNK);
            let got = self.vm_read(addr.wrapping_add(done as u64), &mut buf[done..done + want]);
            if got > 0 {
                done += got;
                read += got;
                continue;
            }
            // Unreadable page: leave it zeroed and go on at the next one.
            let here = addr.wrapping_add(done as u64);
            let to_next_page = PAGE - here % PAGE;
            let skip = (to_next_page as usize).min(buf.len() - done);
            buf[done..done + skip].fill(0);
            done += skip;
        }
        read
    }

    /// One `process_vm_readv`: the bytes it read (0 on a fault at `addr`).
    fn vm_read(&self, addr: u64, buf: &mut [u8]) -> usize {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which we own mutably; the remote
        // side is only read by the kernel, which checks it.
        let got =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        usize::try_from(got).unwrap_or(0)
    }

    fn fill(&self, buf: &mut [u8], addr: u64) -> Result<(), ReadError> {
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|cause| ReadError::Unreadable {
                addr,
                len: buf.len(),
                cause,
            })
    }

    fn exact<const N: usize>(&self, addr: u64) -> Result<[u8; N], ReadError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, addr)?;
        Ok(buf)
    }

    pub fn u8(&self, addr: u64) -> Result<u8, ReadError> {
        Ok(self.exact::<1>(addr)?[0])
    }

    pub fn i32(&self, addr: u64) -> Result<i32, ReadError> {
        Ok(i32::from_le_bytes(self.exact(addr)?))
    }

    pub fn u64(&self, addr: u64) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.exact(addr)?))
    }

    /// A length field (a `u64` at `addr`) that must not exceed `max`.
    pub fn length(&self, addr: u64, max: usize) -> Result<usize, ReadError> {
        let len = self.u64(addr)?;
        bounded(addr, len, max)
    }

    /// `len` bytes at `addr`, at most [`MAX_READ`].
    pub fn bytes(&self, addr: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        let len = bounded(addr, len as u64, MAX_READ)?;
        let mut buf = vec![0u8; len];
        self.fill(&mut buf, addr)?;
        Ok(buf)
    }

    /// The NUL-terminated string at `addr`, its NUL within the first `max`
    /// bytes (or before the mapping ends).
    pub fn c_string(&self, addr: u64, max: usize) -> Result<String, ReadError> {
        let max = bounded(addr, max as u64, MAX_READ)?;
        let mut buf = vec![0u8; max];
        let read = self
            .mem
            .read_at(&mut buf, addr)
            .map_err(|cause| ReadError::Unreadable {
                addr,
                len: max,
                cause,
            })?;
        let end = buf[..read]
            .iter()
            .position(|&b| b == 0)
            .ok_or(ReadError::Unterminated { addr, max })?;
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}

fn bounded(addr: u64, len: u64, max: usize) -> Result<usize, ReadError> {
    match usize::try_from(len) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(ReadError::TooLong { addr, len, max }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test process's own memory, read as another process's would be.
    #[test]
    fn typed_and_bounded_reads_of_a_live_process() {
        fn at<T: ?Sized>(value: &T) -> u64 {
            value as *const T as *const u8 as u64
        }
        let memory = ProcessMemory::open(std::process::id()).unwrap();
        let value: (u64, i32, u8) = (0x1122_3344_5566_7788, -5, 0xab);
        assert_eq!(memory.u64(at(&value.0)).unwrap(), value.0);
        assert_eq!(memory.i32(at(&value.1)).unwrap(), value.1);
        assert_eq!(memory.u8(at(&value.2)).unwrap(), value.2);
        let text = b"code\0garbage";
        assert_eq!(memory.c_string(at(text), 32).unwrap(), "code");
        assert!(matches!(
            memory.c_string(at(text), 3),
            Err(ReadError::Unterminated { .. })
        ));
        let huge = 1u64 << 40;
        assert!(matches!(
            memory.length(at(&huge), 4096),
            Err(ReadError::TooLong { .. })
        ));
        assert_eq!(
            memory.length(at(&value.0), usize::MAX).unwrap() as u64,
            value.0
        );
        assert!(matches!(
            memory.bytes(at(text), MAX_READ + 1),
            Err(ReadError::TooLong { .. })
        ));
        assert_eq!(memory.bytes(at(text), 4).unwrap(), b"code");
        let err = memory.u64(0).unwrap_err();
        assert!(matches!(err, ReadError::Unreadable { .. }), "{err}");
    }
}
