//! What a delivery can carry (its encoded properties, header tables of every AMQP field type
//! included, and its body) into the daemon's decision: no panic, one outcome.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| amqp_rpc::fuzzing::delivery(data));
