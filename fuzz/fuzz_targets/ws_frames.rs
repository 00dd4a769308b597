//! WebSocket frames split into arbitrary reads (and a hand-off mid-message) decode exactly as
//! in one read, never panic, and refuse only with RFC 6455 close codes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hermod::fuzzing::ws_stream(data));
