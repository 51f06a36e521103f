//! The port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! A bus is built once, before the vCPUs start, and is immutable afterwards,
//! so a vCPU exit looks its device up without taking a lock on the map.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range the
/// device was inserted at. Accesses come from vCPU threads and carry guest
/// data: implementations must handle every size and offset without
/// panicking.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Collects devices and their ranges; [`BusBuilder::build`] freezes them.
#[derive(Default)]
pub struct BusBuilder {
    entries: Vec<Entry>,
}

impl BusBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some(other) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap {
                base,
                len,
                other: other.base,
            });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    pub fn build(mut self) -> Bus {
        self.entries.sort_by_key(|e| e.base);
        Bus {
            entries: self.entries,
        }
    }
}

/// An immutable set of devices indexed by address.
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(idx.checked_sub(1)?)?;
        let offset = addr - entry.base;
        (offset < entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`. Returns false when nothing is there
    /// (the caller decides what an unclaimed read returns).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a previous holder panicked: a device
/// model's state is still the best there is, and the VMM must keep going.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        let b = Arc::new(Mutex::new(Recorder(vec![])));
        let mut builder = BusBuilder::new();
        builder.insert(a.clone(), 0x3f8, 8).unwrap();
        builder.insert(b.clone(), 0x60, 5).unwrap();
        assert_eq!(
            builder.insert(b.clone(), 0x3fc, 8),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8,
                other: 0x3f8
            })
        );
        assert!(matches!(
            builder.insert(b.clone(), 0x10, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            builder.insert(b.clone(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        let bus = builder.build();

        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(lock(&b).0, vec![(4, vec![0xfe])]);
        assert!(!bus.read(0x3f7, &mut buf));
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.write(0x65, &[1]));
        assert!(!bus.read(0, &mut buf));
    }
}
