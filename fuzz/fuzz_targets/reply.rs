//! What a reply can carry into the client's reply handling: no panic, and the waiting call
//! ends at most once, only with a reply that is its own.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| amqp_rpc::fuzzing::reply(data));
