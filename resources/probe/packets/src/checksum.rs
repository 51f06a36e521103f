//! The Internet checksum (RFC 1071): ones' complement sum of 16-bit words.

/// Running ones' complement sum; feed it slices, then `finish`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Checksum {
    sum: u32,
    /// A byte left over from an odd-length slice, waiting for its pair.
    pending: Option<u8>,
}

impl Checksum {
    pub const fn new() -> Self {
        Checksum {
            sum: 0,
            pending: None,
        }
    }

    pub fn add_bytes(&mut self, mut bytes: &[u8]) -> &mut Self {
        if let Some(high) = self.pending.take() {
            match bytes.split_first() {
                Some((&low, rest)) => {
                    self.add_word(u16::from_be_bytes([high, low]));
                    bytes = rest;
                }
                None => {
                    self.pending = Some(high);
                    return self;
                }
            }
        }
        let mut words = bytes.chunks_exact(2);
        for word in &mut words {
            self.add_word(u16::from_be_bytes([word[0], word[1]]));
        }
        if let [last] = words.remainder() {
            self.pending = Some(*last);
        }
        self
    }

    pub fn add_word(&mut self, word: u16) -> &mut Self {
        self.sum += word as u32;
        // Fold early so the u32 never overflows, however much is added.
        if self.sum > 0xFFFF {
            self.sum = (self.sum & 0xFFFF) + (self.sum >> 16);
        }
        self
    }

    /// The checksum field value: complement of the folded sum.
    pub fn finish(&self) -> u16 {
        let mut sum = self.sum;
        if let Some(high) = self.pending {
            sum += (high as u32) << 8;
        }
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }
}

/// Checksum of one byte string.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    Checksum::new().add_bytes(bytes).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A well-known example header (checksum field 0xb861 zeroed).
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0xb861);
        let mut with_sum = header;
        with_sum[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(internet_checksum(&with_sum), 0);
    }

    #[test]
    fn odd_lengths_and_split_input_agree() {
        let data = [0x12, 0x34, 0x56, 0x78, 0x9a];
        let whole = internet_checksum(&data);
        // Odd length: the last byte is the high half of a zero-padded word.
        // 1234 + 5678 + 9a00 = 102ac, folded 02ad, complemented fd52.
        assert_eq!(whole, 0xfd52);
        for split in 0..=data.len() {
            let mut c = Checksum::new();
            c.add_bytes(&data[..split]).add_bytes(&data[split..]);
            assert_eq!(c.finish(), whole, "split at {split}");
        }
    }

    #[test]
    fn carries_fold() {
        assert_eq!(internet_checksum(&[0xff, 0xff, 0xff, 0xff]), 0x0000);
        assert_eq!(internet_checksum(&[0xff, 0xfe, 0x00, 0x02]), 0xfffe);
        assert_eq!(internet_checksum(&[]), 0xffff);
    }
}
