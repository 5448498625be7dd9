//! Framing of the two kinds of stream, with hard limits.
//!
//! Control stream: `[u32 len][Control]`. Data stream: `[u32 header_len]
//! [u32 payload_len][BatchHeader][payload]`; the payload is kept out of the
//! protobuf so a batch is sent as two buffers and never copied to be framed.
//! All integers are big endian. Every length is checked against its limit
//! before a byte is buffered for it, so a hostile peer cannot make the
//! receiver allocate more than one frame's limit per stream.
//!
//! Decoders are incremental, in the style of mini-redis: feed bytes into a
//! buffer, get `Ok(None)` while a frame is incomplete, `Ok(Some(_))` for a
//! whole frame, and an error for a frame that can never become valid.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::pb;

/// Largest control message (a State with thousands of mappings fits).
pub const MAX_CONTROL_FRAME: usize = 16 << 20;
/// Largest batch header (runs are 3 varints each).
pub const MAX_BATCH_HEADER: usize = 256 << 10;
/// Largest batch payload, compressed or not, and largest decompressed size.
pub const MAX_BATCH_PAYLOAD: usize = 8 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("{what} frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("{what} frame does not decode: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    Truncated { buffered: usize },
    #[error("empty control message (no known message in it: a newer peer?)")]
    EmptyControl,
}

/// Appends one control frame to `out`.
pub fn encode_control(msg: &pb::Control, out: &mut BytesMut) {
    let len = msg.encoded_len();
    debug_assert!(len <= MAX_CONTROL_FRAME, "control message too large");
    out.reserve(4 + len);
    out.put_u32(len as u32);
    msg.encode(out).expect("reserved enough");
}

/// Takes one control frame off the front of `buf`, if it is all there.
pub fn decode_control(buf: &mut BytesMut) -> Result<Option<pb::Control>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(FrameError::TooLarge {
            what: "control",
            len,
            limit: MAX_CONTROL_FRAME,
        });
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len).freeze();
    let msg = pb::Control::decode(body).map_err(|e| FrameError::Malformed {
        what: "control",
        reason: e.to_string(),
    })?;
    if msg.msg.is_none() {
        return Err(FrameError::EmptyControl);
    }
    Ok(Some(msg))
}

/// A batch as it travels: the decoded header and the (maybe compressed)
/// payload.
#[derive(Debug, Clone, PartialEq)]
pub struct WireBatch {
    pub header: pb::BatchHeader,
    pub payload: Bytes,
}

/// The prefix and header of a data frame; the payload goes after it as is.
pub fn encode_batch_prefix(header: &pb::BatchHeader, payload_len: usize) -> Bytes {
    let hlen = header.encoded_len();
    debug_assert!(hlen <= MAX_BATCH_HEADER && payload_len <= MAX_BATCH_PAYLOAD);
    let mut out = BytesMut::with_capacity(8 + hlen);
    out.put_u32(hlen as u32);
    out.put_u32(payload_len as u32);
    header.encode(&mut out).expect("reserved enough");
    out.freeze()
}

/// Takes one data frame off the front of `buf`, if it is all there.
pub fn decode_batch(buf: &mut BytesMut) -> Result<Option<WireBatch>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let hlen = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    let plen = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    if hlen > MAX_BATCH_HEADER {
        return Err(FrameError::TooLarge {
            what: "batch header",
            len: hlen,
            limit: MAX_BATCH_HEADER,
        });
    }
    if plen > MAX_BATCH_PAYLOAD {
        return Err(FrameError::TooLarge {
            what: "batch payload",
            len: plen,
            limit: MAX_BATCH_PAYLOAD,
        });
    }
    let total = 8 + hlen + plen;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(8);
    let header = pb::BatchHeader::decode(buf.split_to(hlen).freeze()).map_err(|e| {
        FrameError::Malformed {
            what: "batch header",
            reason: e.to_string(),
        }
    })?;
    let payload = buf.split_to(plen).freeze();
    Ok(Some(WireBatch { header, payload }))
}

/// Call when a stream ends: leftover bytes mean the peer stopped mid-frame.
pub fn check_eof(buf: &BytesMut) -> Result<(), FrameError> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(FrameError::Truncated {
            buffered: buf.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> pb::Control {
        pb::Control {
            msg: Some(pb::control::Msg::Hello(pb::Hello {
                version: 1,
                session: Bytes::from_static(&[7; 16]),
                page_size: 4096,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn control_round_trip_byte_by_byte() {
        let mut wire = BytesMut::new();
        encode_control(&hello(), &mut wire);
        encode_control(&hello(), &mut wire);
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(m) = decode_control(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![hello(), hello()]);
        check_eof(&buf).unwrap();
    }

    #[test]
    fn oversized_control_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_CONTROL_FRAME as u32 + 1);
        assert!(matches!(
            decode_control(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_control_is_malformed_not_a_panic() {
        let mut buf = BytesMut::new();
        buf.put_u32(5);
        buf.put_slice(&[0xff; 5]);
        assert!(matches!(
            decode_control(&mut buf),
            Err(FrameError::Malformed { .. })
        ));
        let mut empty = BytesMut::new();
        empty.put_u32(0);
        assert_eq!(decode_control(&mut empty), Err(FrameError::EmptyControl));
    }

    #[test]
    fn truncated_frame_is_reported_at_eof() {
        let mut wire = BytesMut::new();
        encode_control(&hello(), &mut wire);
        wire.truncate(wire.len() - 1);
        assert_eq!(decode_control(&mut wire).unwrap(), None);
        assert!(matches!(
            check_eof(&wire),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn batch_round_trip_and_limits() {
        let header = pb::BatchHeader {
            layer: 3,
            seq: 9,
            runs: vec![pb::Run {
                addr: 0x1000,
                pages: 1,
                kind: pb::RunKind::Data as i32,
            }],
            compression: pb::Compression::None as i32,
            raw_len: 4,
        };
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode_batch_prefix(&header, 4));
        buf.extend_from_slice(b"abcd");
        let b = decode_batch(&mut buf).unwrap().unwrap();
        assert_eq!(b.header, header);
        assert_eq!(&b.payload[..], b"abcd");
        assert!(buf.is_empty());

        let mut big = BytesMut::new();
        big.put_u32(8);
        big.put_u32(MAX_BATCH_PAYLOAD as u32 + 1);
        assert!(matches!(
            decode_batch(&mut big),
            Err(FrameError::TooLarge { .. })
        ));
        let mut bighdr = BytesMut::new();
        bighdr.put_u32(u32::MAX);
        bighdr.put_u32(0);
        assert!(matches!(
            decode_batch(&mut bighdr),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
