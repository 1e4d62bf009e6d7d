//! Reading the kernel's event ring buffer, woken by epoll through
//! `tokio::io::unix::AsyncFd`.
use anyhow::{Result, anyhow};
use aya::maps::{MapData, RingBuf};
use pymem_common::Event;
use tokio::io::{Interest, unix::AsyncFd};

pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    pub fn new(ring: RingBuf<MapData>) -> Result<Self> {
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd
        // owns the RingBuf, and never swaps it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow!("registering the ring buffer with epoll: {e}"))?;
        Ok(Self { ring })
    }

    /// Waits for events and returns all that are ready.
    pub async fn next_batch(&mut self) -> Result<Vec<Event>> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            batch.push(parse(&item)?);
        }
        guard.clear_ready();
        Ok(batch)
    }
}

fn parse(bytes: &[u8]) -> Result<Event> {
    if bytes.len() < size_of::<Event>() {
        return Err(anyhow!("short ring buffer record: {} bytes", bytes.len()));
    }
    // SAFETY: Event is plain integers, any bit pattern is valid; the record
    // may be unaligned, so read it unaligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}
