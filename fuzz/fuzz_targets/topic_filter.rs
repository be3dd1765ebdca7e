#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| iot_operator::fuzzing::topic_filter(data));
