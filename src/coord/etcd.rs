//! [`Store`] on a real etcd (v3 API, tested against Debian 12's 3.4.23)
//! through the `etcd-client` crate, which shares our tonic.
//!
//! Every call runs under [`CALL_TIMEOUT`]: across a partition a gRPC call
//! would otherwise wait for TCP to give up, far longer than a lease lives,
//! and the fencing logic needs "failed" rather than "still waiting".

use super::store::{Cas, Entry, Store};
use super::CoordError;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use futures::future::BoxFuture;
use std::future::Future;
use std::time::Duration;

/// The deadline of one etcd call. Renewals do not wait for each other
/// (`coord::lease`), so this only bounds how long one attempt is kept; on
/// a loaded 2-core machine answers were seen to take over 1.5 s.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(3000);

pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

impl EtcdStore {
    /// Connect (lazily: a down etcd shows at the first call, which
    /// [`super::connect`] makes).
    pub async fn connect(endpoints: &[String]) -> Result<Self, CoordError> {
        if endpoints.is_empty() {
            return Err(CoordError::Config("no etcd endpoints".into()));
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        let client = tokio::time::timeout(
            CALL_TIMEOUT * 2,
            Client::connect(endpoints.to_vec(), Some(opts)),
        )
        .await
        .map_err(|_| unreachable(endpoints, "connect timed out"))?
        .map_err(|e| unreachable(endpoints, &e.to_string()))?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
        })
    }

    /// One call, under [`CALL_TIMEOUT`] in all. A request that could not
    /// even connect (a dead member among several: the client's balancer
    /// still picks it now and then) never reached etcd, so it is sent again
    /// (to whichever member the balancer picks next) until the deadline;
    /// any other failure is returned at once, since a compare-and-set that
    /// may have been applied must not be repeated blindly.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, CoordError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, f(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if never_sent(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!("{what}: {e}; sending it again");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => return Err(unreachable(&self.endpoints, &format!("{what}: {e}"))),
                Err(_) => {
                    return Err(unreachable(
                        &self.endpoints,
                        &format!("{what}: no answer within {} ms", CALL_TIMEOUT.as_millis()),
                    ))
                }
            }
        }
    }
}

/// The request failed before it was sent: the connection to the member
/// could not be made.
fn never_sent(e: &etcd_client::Error) -> bool {
    let s = e.to_string();
    s.contains("tcp connect error") || s.contains("Connection refused")
}

fn unreachable(endpoints: &[String], why: &str) -> CoordError {
    CoordError::Unavailable(format!("etcd at {}: {why}", endpoints.join(",")))
}

fn entry(kv: &etcd_client::KeyValue) -> Entry {
    Entry {
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        lease: kv.lease(),
    }
}

impl Store for EtcdStore {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, CoordError>> {
        Box::pin(async move {
            let secs = ttl.as_secs().max(1) as i64;
            let r = self
                .call("lease grant", |mut c| async move {
                    c.lease_grant(secs, None).await
                })
                .await?;
            Ok(r.id())
        })
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, CoordError>> {
        Box::pin(async move {
            let once = |mut c: Client| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                let msg = stream.message().await?;
                Ok::<_, etcd_client::Error>(msg.map(|m| m.ttl()).unwrap_or(0))
            };
            let ttl = self.call("lease keep-alive", once).await?;
            if ttl <= 0 {
                return Err(CoordError::LeaseGone(lease));
            }
            Ok(Duration::from_secs(ttl as u64))
        })
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), CoordError>> {
        Box::pin(async move {
            self.call("lease revoke", |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await?;
            Ok(())
        })
    }

    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Entry>, CoordError>> {
        Box::pin(async move {
            let r = self
                .call("get", |mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                })
                .await?;
            Ok(r.kvs().first().map(entry))
        })
    }

    fn list(&self, prefix: String) -> BoxFuture<'_, Result<Vec<(String, Entry)>, CoordError>> {
        Box::pin(async move {
            let r = self
                .call("get prefix", |mut c| {
                    let prefix = prefix.clone();
                    async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
                })
                .await?;
            Ok(r.kvs()
                .iter()
                .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), entry(kv)))
                .collect())
        })
    }

    fn cas(
        &self,
        key: String,
        expected: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> BoxFuture<'_, Result<Cas, CoordError>> {
        Box::pin(async move {
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    expected,
                )])
                .and_then([TxnOp::put(key.clone(), value, opts)])
                .or_else([TxnOp::get(key, None)]);
            let r = self
                .call("compare-and-set", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if r.succeeded() {
                let rev = r.header().map(|h| h.revision()).unwrap_or(0);
                return Ok(Cas::Done(rev));
            }
            let now = r.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(entry)),
                _ => None,
            });
            Ok(Cas::Conflict(now.flatten()))
        })
    }

    fn delete_if(&self, key: String, expected: i64) -> BoxFuture<'_, Result<bool, CoordError>> {
        Box::pin(async move {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    expected,
                )])
                .and_then([TxnOp::delete(key, None)]);
            let r = self
                .call("compare-and-delete", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            Ok(r.succeeded())
        })
    }
}
