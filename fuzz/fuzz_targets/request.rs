//! A logged-in client's text frame through a real engine: every request answered once.
#![no_main]
use std::cell::RefCell;

use hermod_shards::fuzzing::{request, Harness};

thread_local! {
    // One engine for the whole run: building one (two accounts, a login) costs milliseconds.
    static HARNESS: RefCell<Harness> = RefCell::new(Harness::new());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| request(&mut h.borrow_mut(), data));
});
