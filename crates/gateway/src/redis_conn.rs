//! One lazily opened, self-reconnecting Redis connection, shared by the stores that keep state in
//! Redis (the rate limits' buckets, the replicas' slot counts): nothing connects until the first call,
//! and a failed first connect is tried again by the next call.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// A Redis client and its one multiplexed connection, opened on first use. Cloning shares both.
#[derive(Clone)]
pub struct LazyRedis {
    client: redis::Client,
    conn: Arc<OnceCell<ConnectionManager>>,
}

impl LazyRedis {
    /// A handle for `url`; only the URL is checked here.
    pub fn open(url: &str) -> Result<Self, String> {
        Ok(Self { client: redis::Client::open(url).map_err(|e| e.to_string())?, conn: Arc::new(OnceCell::new()) })
    }

    /// The client (for connections of another kind, such as pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The shared connection, opened now if it is not yet (a connect waits at most 500 ms).
    pub async fn conn(&self) -> Result<ConnectionManager, String> {
        let cfg =
            ConnectionManagerConfig::new().set_connection_timeout(Duration::from_millis(500)).set_number_of_retries(1);
        self.conn
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), cfg))
            .await
            .cloned()
            .map_err(|e| e.to_string())
    }
}
