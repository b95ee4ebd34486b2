//! Any TOML text through the config loader and validation: see `llm_gateway::fuzzing::config`.
fn main() {
    afl::fuzz!(|data: &[u8]| llm_gateway::fuzzing::config(data));
}
