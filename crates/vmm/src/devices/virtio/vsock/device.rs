//! placeholder
use crate::config::VsockConfig;
use crate::devices::virtio::*;
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
/// x
#[derive(Debug)]
pub struct Vsock { q: [u16; 3] }
impl Vsock {
    /// x
    pub fn new(_c: &VsockConfig) -> std::io::Result<Self> { Ok(Vsock{q:[256;3]}) }
}
impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 { TYPE_VSOCK }
    fn queue_max_sizes(&self) -> &[u16] { &self.q }
    fn avail_features(&self) -> u64 { 0 }
    fn read_config(&self, _o: u64, d: &mut [u8]) { d.fill(0) }
    fn activate(&mut self, _f: u64, _c: ActivateContext) -> Result<(), ActivateError> { Ok(()) }
    fn is_activated(&self) -> bool { false }
    fn reset(&mut self) {}
    fn handle_event(&mut self, _t: u32, _e: EventSet) {}
    fn queues(&self) -> &[Queue] { &[] }
    fn save_state(&self) -> serde_json::Value { serde_json::Value::Null }
}
