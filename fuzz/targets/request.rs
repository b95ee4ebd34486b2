//! `RequestFeatures::parse` on any bytes: see `gateway_core::request::check_any_body`.
fn main() {
    afl::fuzz!(|data: &[u8]| gateway_core::request::check_any_body(data));
}
