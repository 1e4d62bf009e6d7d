//! Reading the kernel's event ring buffer, woken by epoll through
//! `tokio::io::unix::AsyncFd`.
use anyhow::{Result, anyhow};
use aya::maps::{MapData, RingBuf};
use log::warn;
use pymem_common::Event;
use tokio::io::{Interest, unix::AsyncFd};

pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
    malformed: u64,
}

impl EventStream {
    pub fn new(ring: RingBuf<MapData>) -> Result<Self> {
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd
        // owns the RingBuf, and never swaps it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow!("registering the ring buffer with epoll: {e}"))?;
        Ok(Self { ring, malformed: 0 })
    }

    /// Waits for events and returns all that are ready; malformed records
    /// are counted and skipped.
    pub async fn next_batch(&mut self) -> Result<Vec<Event>> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            accept(&item, &mut batch, &mut self.malformed);
        }
        guard.clear_ready();
        Ok(batch)
    }

    /// Records skipped because they were not events.
    pub fn malformed_records(&self) -> u64 {
        self.malformed
    }
}

/// Adds the event `bytes` holds to `batch`, or counts it in `malformed`
/// (warning on the first).
fn accept(bytes: &[u8], batch: &mut Vec<Event>, malformed: &mut u64) {
    match parse(bytes) {
        Some(event) => batch.push(event),
        None => {
            if *malformed == 0 {
                warn!(
                    "skipping a ring buffer record of {} bytes (an event is {}); pymem_malformed_event_records_total counts them",
                    bytes.len(),
                    size_of::<Event>()
                );
            }
            *malformed += 1;
        }
    }
}

fn parse(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain integers, any bit pattern is valid; the record
    // may be unaligned, so read it unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_record_is_counted_and_the_next_one_still_read() {
        let event = Event {
            kind: 4,
            tgid: 42,
            addr: 0x1000,
            ..Event::default()
        };
        // SAFETY: Event is plain integers.
        let whole = unsafe {
            std::slice::from_raw_parts((&event as *const Event).cast::<u8>(), size_of::<Event>())
        };
        let mut batch = Vec::new();
        let mut malformed = 0;
        for record in [&whole[..7], &[][..], whole] {
            accept(record, &mut batch, &mut malformed);
        }
        assert_eq!(batch, [event]);
        assert_eq!(malformed, 2);
    }
}
