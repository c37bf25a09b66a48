//! The shape of a direct reply-to address, as every RabbitMQ from 3.10 to 4.3 builds it:
//! `amq.rabbitmq.reply-to.` + base64(pid) + `.` + base64(key), standard alphabet, padded.
//!
//! - The key is 16 random bytes (24 base64 characters).
//! - The pid is an Erlang external term, NEW_PID_EXT: `131, 88, 118` (version, NEW_PID_EXT,
//!   ATOM_UTF8_EXT), a 16-bit node-name length, the node name, then ID, Serial and Creation
//!   (32 bits each). The node name is not the broker's: it is `reply@` + the decimal
//!   `erlang:phash2` (below 2^27) of the broker node's name.
//!
//! Built by `rabbit_direct_reply_to` with `pid_recomposition` (3.10–4.1) and by
//! `rabbit_volatile_queue` with `rabbit_pid_codec` (4.2, 4.3), byte for byte alike. RabbitMQ
//! 3.10.0–3.10.11 and 3.11.0–3.11.3 decode a two-part suffix with no error handling, and 3.12
//! to 4.0 fall back to such a decode when the first fails, so anything else with one dot in it
//! crashes the publishing channel, and the broker closes the whole connection (541); 4.1 and
//! later drop it. Two well-formed cases still crash the oldest of them: a node hash that is not
//! a running node of the cluster (rabbitmq-server#6396), and a pid of the broker's own node
//! whose ID or Serial is beyond what Erlang/OTP 25 accepts. Those are told apart here as
//! [`Direct::Unusual`] or by the node hash, for the daemon to send such replies where a crash
//! costs nothing (`server/reply_link.rs`).

/// A direct reply-to suffix that has the broker's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direct {
    /// As a broker makes them.
    Usual {
        /// The `phash2` of the node that handed it out.
        node: u32,
    },
    /// Well-formed, but with an ID or Serial no pid of Erlang/OTP 25 or older has.
    Unusual {
        /// The `phash2` of the node it names.
        node: u32,
    },
}

/// `erlang:phash2` values are below 2^27.
const MAX_NODE_HASH: u32 = (1 << 27) - 1;

/// The suffix after `amq.rabbitmq.reply-to.`, if it has the broker's shape.
pub fn parse(suffix: &str) -> Option<Direct> {
    let (pid, key) = suffix.split_once('.')?;
    if key.contains('.') || key.len() != 24 || decode(key)?.len() != 16 {
        return None;
    }
    let pid = decode(pid)?;
    let rest = pid.strip_prefix(&[131, 88, 118])?;
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() != len + 12 {
        return None;
    }
    let (name, numbers) = rest.split_at(len);
    let hash = std::str::from_utf8(name).ok()?.strip_prefix("reply@")?;
    let leading_zero = hash.len() > 1 && hash.starts_with('0');
    if hash.is_empty()
        || hash.len() > 9
        || leading_zero
        || !hash.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let node: u32 = hash.parse().ok().filter(|h| *h <= MAX_NODE_HASH)?;
    let id = u32::from_be_bytes(numbers[0..4].try_into().ok()?);
    let serial = u32::from_be_bytes(numbers[4..8].try_into().ok()?);
    Some(match id <= 0x7FFF && serial <= 0x1FFF {
        true => Direct::Usual { node },
        false => Direct::Unusual { node },
    })
}

/// Strict standard base64: the `+/` alphabet, `=` padding to a multiple of four, and no
/// stray bits in the last character, as Erlang's `base64:decode` wants it.
fn decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let pad = bytes.iter().rev().take_while(|&&b| b == b'=').count();
    if pad > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let mut acc: u32 = 0;
    let data = &bytes[..bytes.len() - pad];
    for (i, &b) in data.iter().enumerate() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        if i % 4 == 3 {
            out.extend_from_slice(&acc.to_be_bytes()[1..]);
            acc = 0;
        }
    }
    match data.len() % 4 {
        0 => {}
        2 if acc & 0xF == 0 => out.push((acc >> 4) as u8),
        3 if acc & 0x3 == 0 => out.extend_from_slice(&((acc >> 2) as u16).to_be_bytes()),
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handed out by this project's RabbitMQ 3.10.8 (node `rabbit@localhost`), and by 3.12
    /// and 4.x brokers in public reports.
    const GENUINE: [&str; 4] = [
        "g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsDK.2CUud3s79kInSgWszR/mDw==",
        "g1h2AA1yZXBseUA5MjQ4ODg0AAA8EgAAAABrDsDK.qd8C/DGco8FB5GSuXVJl9g==",
        "g1h2AA5yZXBseUAyNzIyNTAxMAAABrcAAAAAZl7V7w==.oyvwJ9+5nczD2h7KpiJN0Q==",
        "g1h2AA9yZXBseUAxMjE4OTkyMDEAAAliAAAQxGUp3Wg=.V/BE0fSg1i3Cp0bpYeJqWw==",
    ];

    #[test]
    fn genuine_addresses_parse_with_their_node() {
        assert_eq!(parse(GENUINE[0]), Some(Direct::Usual { node: 9248884 }));
        assert_eq!(parse(GENUINE[1]), Some(Direct::Usual { node: 9248884 }));
        assert_eq!(parse(GENUINE[2]), Some(Direct::Usual { node: 27225010 }));
        assert_eq!(parse(GENUINE[3]), Some(Direct::Usual { node: 121899201 }));
    }

    #[test]
    fn what_crashes_old_brokers_does_not_parse() {
        for bad in [
            "",
            ".",
            "x",
            "AAAA",
            "AAAA.BBBB",
            "a.b",
            "aGVsbG8=.x",
            "anything.at.all",
            // The genuine pid with a url-safe key, unpadded, or a third part.
            "g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsDK.2CUud3s79kInSgWszR_mDw==",
            "g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsDK.2CUud3s79kInSgWszR/mDw",
            "g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsDK.2CUud3s79kInSgWszR/mDw==.x",
            // Old formats (term_to_binary with the real node name), never made by 3.10+.
            "g1hkABNyYWJiaXRANzQwNDVlYWQ5ZTgwAAAG2AAAAABfmnkW.2CUud3s79kInSgWszR/mDw==",
            // A pid one byte short, and a key with stray bits in its last character.
            "g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsA=.2CUud3s79kInSgWszR/mDw==",
            "g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsDK.2CUud3s79kInSgWszR/mDx==",
            "!!!!.????",
            "ünïcode.2CUud3s79kInSgWszR/mDw==",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn node_names_must_be_a_phash2() {
        let pid = |node: &str, id: u32| {
            let mut b = vec![131, 88, 118];
            b.extend_from_slice(&(node.len() as u16).to_be_bytes());
            b.extend_from_slice(node.as_bytes());
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
            b.extend_from_slice(&1u32.to_be_bytes());
            format!("{}.2CUud3s79kInSgWszR/mDw==", encode(&b))
        };
        assert_eq!(parse(&pid("reply@0", 1)), Some(Direct::Usual { node: 0 }));
        assert_eq!(
            parse(&pid("reply@134217727", 1)),
            Some(Direct::Usual {
                node: MAX_NODE_HASH
            })
        );
        assert_eq!(
            parse(&pid("reply@9248884", 0x8000)),
            Some(Direct::Unusual { node: 9248884 })
        );
        for node in [
            "reply@134217728",
            "reply@01",
            "reply@",
            "reply@+1",
            "rabbit@host",
            "reply@1x",
        ] {
            assert_eq!(parse(&pid(node, 1)), None, "{node}");
        }
    }

    #[test]
    fn base64_is_strict_and_round_trips() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = encode(&bytes);
            assert_eq!(
                decode(&text).as_deref(),
                (len > 0).then_some(&bytes[..]),
                "{text}"
            );
        }
        for bad in ["A", "AA", "AAA", "AA=A", "A===", "AB==", "ABC=", "-_AA"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    /// Standard padded base64, for building test input.
    fn encode(bytes: &[u8]) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
