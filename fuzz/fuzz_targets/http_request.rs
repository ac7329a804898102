//! An HTTP request's bytes, fed in pieces as a socket would deliver them, through the
//! HTTP side's parser: `http::fuzz` checks that the incremental reader and the one-shot
//! parser agree, that an answer never changes as bytes arrive, and that no page lets
//! markup through.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| notifd::http::fuzz(data));
