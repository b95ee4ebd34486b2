//! The usage scanner on any stream, in any chunks: see `llm_gateway::fuzzing::usage`.
fn main() {
    afl::fuzz!(|data: &[u8]| llm_gateway::fuzzing::usage(data));
}
