//! The shape of the gateway's upkeep loops: a tick now and every `period` after, until the gateway
//! stops or the tick says its subject is gone.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Calls `tick` at once and then every `period` until `stop` is cancelled or `tick` returns `false`
/// (what it keeps up, such as the fleet in force, is gone with the gateway).
pub async fn every(period: Duration, stop: CancellationToken, mut tick: impl FnMut() -> bool) {
    while tick() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_at_once_then_each_period_until_told_to_stop() {
        let start = tokio::time::Instant::now();
        let mut at = Vec::new();
        every(Duration::from_millis(100), CancellationToken::new(), || {
            at.push(start.elapsed().as_millis());
            at.len() < 3
        })
        .await;
        assert_eq!(at, vec![0, 100, 200]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_stop_ends_the_loop_before_the_next_tick() {
        let stop = CancellationToken::new();
        let mut ticks = 0;
        let cancel = stop.clone();
        every(Duration::from_secs(1), stop, || {
            ticks += 1;
            cancel.cancel();
            true
        })
        .await;
        assert_eq!(ticks, 1);
    }
}
