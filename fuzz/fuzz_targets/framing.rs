#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| harbor_gateway_fuzz::framing(data));
