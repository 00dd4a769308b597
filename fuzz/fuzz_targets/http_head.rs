//! The HTTP request head: routing never panics and respects the head limits.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hermod::fuzzing::http_head(data));
