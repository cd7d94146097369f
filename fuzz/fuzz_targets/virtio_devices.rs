//! Every virtio device of vessel-vmm (block, net, vsock, balloon, rng; the first byte picks
//! one) driven by a hostile driver: fuzzer-chosen descriptor tables, buffer contents and
//! ring indices. See `vessel_vmm::fuzzing::virtio_queues`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vessel_vmm::fuzzing::virtio_queues(data);
});
