//! `[DONE]` detection and usage-event stripping on any stream, in any chunks: see `llm_gateway::fuzzing::relay`.
fn main() {
    afl::fuzz!(|data: &[u8]| llm_gateway::fuzzing::relay(data));
}
