//! Control-queue commands (virtio 1.x, 5.1.6.5): parsed from the bytes the
//! driver supplies, each checked for its exact length before it is acted
//! on. A command that fails to parse is answered VIRTIO_NET_ERR.

use net::MacAddr;
use virtio_bindings::virtio_net::*;

/// Largest command payload accepted: a full MAC_TABLE_SET (two counts and
/// 64 entries) fits many times over; anything bigger is refused before it
/// is copied.
pub const MAX_COMMAND_LEN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxMode {
    Promisc,
    AllMulti,
    AllUni,
    NoMulti,
    NoUni,
    NoBcast,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlCommand {
    RxMode(RxMode, bool),
    MacTableSet {
        unicast: Vec<MacAddr>,
        multicast: Vec<MacAddr>,
    },
    MacAddrSet(MacAddr),
    VlanAdd(u16),
    VlanDel(u16),
    AnnounceAck,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CtrlError {
    #[error("command shorter than its 2-byte header")]
    NoHeader,
    #[error("unknown command class {class} cmd {cmd}")]
    Unknown { class: u8, cmd: u8 },
    #[error("class {class} cmd {cmd}: expected {expected} bytes of data, got {got}")]
    BadLength {
        class: u8,
        cmd: u8,
        expected: usize,
        got: usize,
    },
    #[error("MAC table claims {entries} entries, only {room} bytes follow")]
    BadMacTable { entries: u32, room: usize },
    #[error("VLAN id {0} is out of range")]
    BadVlan(u16),
    #[error("command of {0} bytes is larger than any valid one")]
    TooLong(usize),
    #[error("class {0} was not negotiated")]
    NotNegotiated(u8),
    #[error("descriptor chain loops, ends early or lies outside guest memory")]
    BadChain,
    #[error("no device-writable status byte to answer in")]
    NoStatus,
}

fn exact<const N: usize>(class: u8, cmd: u8, data: &[u8]) -> Result<[u8; N], CtrlError> {
    <[u8; N]>::try_from(data).map_err(|_| CtrlError::BadLength {
        class,
        cmd,
        expected: N,
        got: data.len(),
    })
}

/// Reads one MAC table (`le32 entries; u8 macs[entries][6]`) from the
/// front of `data`, returning it and the rest.
fn mac_table(data: &[u8]) -> Result<(Vec<MacAddr>, &[u8]), CtrlError> {
    let count: [u8; 4] =
        data.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(CtrlError::BadMacTable {
                entries: 0,
                room: data.len(),
            })?;
    let entries = u32::from_le_bytes(count);
    let rest = &data[4..];
    let bytes = usize::try_from(entries)
        .ok()
        .and_then(|n| n.checked_mul(6))
        .filter(|&n| n <= rest.len())
        .ok_or(CtrlError::BadMacTable {
            entries,
            room: rest.len(),
        })?;
    let macs = rest[..bytes]
        .chunks_exact(6)
        .map(|c| {
            let mut m = [0u8; 6];
            m.copy_from_slice(c);
            MacAddr(m)
        })
        .collect();
    Ok((macs, &rest[bytes..]))
}

fn vlan_id(class: u8, cmd: u8, data: &[u8]) -> Result<u16, CtrlError> {
    let vid = u16::from_le_bytes(exact::<2>(class, cmd, data)?);
    if usize::from(vid) >= super::filter::VLAN_COUNT {
        return Err(CtrlError::BadVlan(vid));
    }
    Ok(vid)
}

/// Parses a command: `bytes` is everything the driver made readable.
pub fn parse(bytes: &[u8]) -> Result<CtrlCommand, CtrlError> {
    if bytes.len() > MAX_COMMAND_LEN {
        return Err(CtrlError::TooLong(bytes.len()));
    }
    let (&class, &cmd) = match bytes {
        [class, cmd, ..] => (class, cmd),
        _ => return Err(CtrlError::NoHeader),
    };
    let data = &bytes[2..];
    let unknown = CtrlError::Unknown { class, cmd };
    match (u32::from(class), u32::from(cmd)) {
        (VIRTIO_NET_CTRL_RX, c) => {
            let mode = match c {
                VIRTIO_NET_CTRL_RX_PROMISC => RxMode::Promisc,
                VIRTIO_NET_CTRL_RX_ALLMULTI => RxMode::AllMulti,
                VIRTIO_NET_CTRL_RX_ALLUNI => RxMode::AllUni,
                VIRTIO_NET_CTRL_RX_NOMULTI => RxMode::NoMulti,
                VIRTIO_NET_CTRL_RX_NOUNI => RxMode::NoUni,
                VIRTIO_NET_CTRL_RX_NOBCAST => RxMode::NoBcast,
                _ => return Err(unknown),
            };
            let [on] = exact::<1>(class, cmd, data)?;
            Ok(CtrlCommand::RxMode(mode, on != 0))
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
            let (unicast, rest) = mac_table(data)?;
            let (multicast, rest) = mac_table(rest)?;
            if !rest.is_empty() {
                return Err(CtrlError::BadLength {
                    class,
                    cmd,
                    expected: data.len() - rest.len(),
                    got: data.len(),
                });
            }
            Ok(CtrlCommand::MacTableSet { unicast, multicast })
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => Ok(CtrlCommand::MacAddrSet(
            MacAddr(exact::<6>(class, cmd, data)?),
        )),
        (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD) => {
            Ok(CtrlCommand::VlanAdd(vlan_id(class, cmd, data)?))
        }
        (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_DEL) => {
            Ok(CtrlCommand::VlanDel(vlan_id(class, cmd, data)?))
        }
        // Linux sends the ack with no data descriptor; accept any payload
        // length of zero only, as the spec defines none.
        (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
            exact::<0>(class, cmd, data)?;
            Ok(CtrlCommand::AnnounceAck)
        }
        _ => Err(unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(macs: &[[u8; 6]]) -> Vec<u8> {
        let mut v = (macs.len() as u32).to_le_bytes().to_vec();
        for m in macs {
            v.extend(m);
        }
        v
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse(&[0, 0, 1]),
            Ok(CtrlCommand::RxMode(RxMode::Promisc, true))
        );
        assert_eq!(
            parse(&[0, 5, 0]),
            Ok(CtrlCommand::RxMode(RxMode::NoBcast, false))
        );
        let mut mac_set = vec![1, 0];
        mac_set.extend(table(&[[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]]));
        mac_set.extend(table(&[[1, 0, 0x5e, 0, 0, 1]]));
        assert_eq!(
            parse(&mac_set),
            Ok(CtrlCommand::MacTableSet {
                unicast: vec![MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2])],
                multicast: vec![MacAddr([1, 0, 0x5e, 0, 0, 1])],
            })
        );
        assert_eq!(
            parse(&[1, 1, 2, 0, 0, 0, 0, 7]),
            Ok(CtrlCommand::MacAddrSet(MacAddr([2, 0, 0, 0, 0, 7])))
        );
        assert_eq!(parse(&[2, 0, 100, 0]), Ok(CtrlCommand::VlanAdd(100)));
        assert_eq!(parse(&[2, 1, 0xff, 0x0f]), Ok(CtrlCommand::VlanDel(4095)));
        assert_eq!(parse(&[3, 0]), Ok(CtrlCommand::AnnounceAck));
    }

    #[test]
    fn rejects_hostile_commands() {
        assert_eq!(parse(&[]), Err(CtrlError::NoHeader));
        assert_eq!(parse(&[0]), Err(CtrlError::NoHeader));
        assert_eq!(
            parse(&[0, 0]),
            Err(CtrlError::BadLength {
                class: 0,
                cmd: 0,
                expected: 1,
                got: 0
            })
        );
        assert_eq!(
            parse(&[0, 0, 1, 1]),
            Err(CtrlError::BadLength {
                class: 0,
                cmd: 0,
                expected: 1,
                got: 2
            })
        );
        assert_eq!(
            parse(&[0, 9, 1]),
            Err(CtrlError::Unknown { class: 0, cmd: 9 })
        );
        assert_eq!(
            parse(&[4, 0, 1, 0]),
            Err(CtrlError::Unknown { class: 4, cmd: 0 })
        );
        assert_eq!(parse(&[2, 0, 0x00, 0x10]), Err(CtrlError::BadVlan(4096)));
        assert_eq!(
            parse(&[3, 0, 1]),
            Err(CtrlError::BadLength {
                class: 3,
                cmd: 0,
                expected: 0,
                got: 1
            })
        );
        // A count far beyond the bytes that follow, including u32::MAX.
        let mut lying = vec![1, 0];
        lying.extend(u32::MAX.to_le_bytes());
        assert!(matches!(
            parse(&lying),
            Err(CtrlError::BadMacTable {
                entries: u32::MAX,
                ..
            })
        ));
        let mut short = vec![1, 0];
        short.extend(table(&[[2, 0, 0, 0, 0, 1]]));
        assert!(
            matches!(parse(&short), Err(CtrlError::BadMacTable { .. })),
            "multicast table missing"
        );
        let mut trailing = vec![1, 0];
        trailing.extend(table(&[]));
        trailing.extend(table(&[]));
        trailing.push(0);
        assert!(matches!(parse(&trailing), Err(CtrlError::BadLength { .. })));
        assert_eq!(
            parse(&vec![0u8; MAX_COMMAND_LEN + 1]),
            Err(CtrlError::TooLong(MAX_COMMAND_LEN + 1))
        );
    }
}
