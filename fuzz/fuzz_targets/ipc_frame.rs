//! Bytes on a pipe from a child (or, for a child, from the reactor): `decode` as each of
//! the four record enums, and `FrameReader` fed in reads of any size, which must take
//! the same frames as `decode` on the whole buffer.
//!
//! Input: byte 0 picks the read size, the rest is the pipe's bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use notifd::ipc::{decode, encode, FrameReader, FromMailer, FromStore, ToMailer, ToStore, MAX_FRAME};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

/// The frames `decode` finds one after another in `buf`, up to the first error or
/// incomplete frame; whether it stopped at an error.
fn frames<T: DeserializeOwned>(mut buf: &[u8]) -> (Vec<T>, bool) {
    let mut out = Vec::new();
    loop {
        match decode::<T>(buf) {
            Ok(Some((msg, used))) => {
                assert!(used >= 4 && used <= buf.len() && used - 4 <= MAX_FRAME);
                out.push(msg);
                buf = &buf[used..];
            }
            Ok(None) => {
                // Incomplete only when the prefix or the body it announces is cut short.
                let whole = buf.first_chunk::<4>().map(|h| 4 + u32::from_le_bytes(*h) as usize);
                assert!(whole.is_none_or(|n| n > buf.len()));
                return (out, false);
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return (out, true);
            }
        }
    }
}

fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(stream: &[u8], read: usize) {
    let (want, failed) = frames::<T>(stream);

    // What decodes re-encodes to something that decodes to the same record.
    for msg in &want {
        let mut out = Vec::new();
        encode(msg, &mut out);
        let (again, used) = decode::<T>(&out).expect("re-encoded frame decodes").expect("whole frame");
        assert_eq!(used, out.len());
        assert_eq!(&again, msg);
    }

    let mut reader = FrameReader::default();
    let mut got = Vec::new();
    let mut reader_failed = false;
    'reads: for chunk in stream.chunks(read) {
        let spare = reader.spare(chunk.len());
        spare[..chunk.len()].copy_from_slice(chunk);
        reader.filled(chunk.len());
        loop {
            match reader.next_frame::<T>() {
                Ok(Some(msg)) => got.push(msg),
                Ok(None) => break,
                Err(_) => {
                    reader_failed = true;
                    break 'reads;
                }
            }
        }
    }
    assert_eq!(got, want);
    assert_eq!(reader_failed, failed);
}

fuzz_target!(|data: &[u8]| {
    let Some((&read, stream)) = data.split_first() else { return };
    let read = read as usize % 128 + 1;
    check::<ToStore>(stream, read);
    check::<FromStore>(stream, read);
    check::<ToMailer>(stream, read);
    check::<FromMailer>(stream, read);
});
