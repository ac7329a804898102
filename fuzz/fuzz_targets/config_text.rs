//! A configuration file's text through `Config::parse`: any text is a configuration
//! or an error that names a line of that text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use notifd::config::Config;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // The daemon reads the file with read_to_string, so only UTF-8 reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, "fuzz.conf", Path::new("/fuzz")) {
        // Pure: mail_settings would read the files the configuration names.
        Ok(cfg) => drop(cfg.store_settings()),
        Err(e) => {
            assert!(!e.msg.is_empty());
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= text.split('\n').count(), "line {line} of {e}");
            }
            assert!(!e.to_string().is_empty());
        }
    }
});
