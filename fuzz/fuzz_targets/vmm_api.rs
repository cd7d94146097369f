//! The vessel-vmm control API: request framing and parsing as the server does it, round
//! trips, config validation, and response parsing. See `vessel_vmm::fuzzing::api_requests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vessel_vmm::fuzzing::api_requests(data);
});
