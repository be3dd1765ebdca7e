//! The relay engine: takes plain specs, holds MQTT connections, reports plain state.

pub mod topic;
