//! The config file: any text gives a config or diagnostics with a
//! location, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = edgeferry::Config::from_toml(
        text,
        Path::new("fuzz.toml"),
        Path::new("/nonexistent-edgeferry-fuzz"),
    );
});
