//! What loadgen drives: a relay (`relay_target::Harness`) or an MQTT broker
//! (`mqtt::MqttHarness`), each with the whole population connected.

use std::time::Duration;

use crate::phase::{PhaseResult, PhaseSpec};

/// A target loadgen can run phases against.
pub(crate) trait Target {
    /// Runs one phase. With `offline_return`, the offline devices reconnect that long after
    /// the phase starts (once per run).
    fn run_phase(
        &self,
        spec: &PhaseSpec,
        offline_return: Option<Duration>,
    ) -> impl std::future::Future<Output = PhaseResult>;
}
