//! Which Redis is the primary, the connection to it, and following it through a failover.
//!
//! With `REDIS_URL` alone the primary is that server. With Sentinel (`REDIS_SENTINELS`,
//! `REDIS_SENTINEL_MASTER`) every process asks the sentinels which server is the primary and
//! under which **configuration epoch** (Sentinel raises it at every failover, by a vote of a
//! majority of sentinels), connects there (with `REDIS_URL`'s password and database), checks
//! that it is a primary (`ROLE`), loads the function library, and from then on asks the
//! sentinels again every second, and at once after a command failed, switching every new
//! command (and the blocking waits) to the new primary when it changed.
//!
//! The epoch is what keeps fencing tokens unique across a failover: a claim's new token is at
//! least `epoch << 32` (see [`Primary::fence_floor`]), so a token granted under a new primary
//! is higher than every token any earlier primary granted, even one whose write was lost with
//! it.

use std::{
    sync::{Arc, RwLock, Weak},
    time::Duration,
};

use redis::{Client, ConnectionAddr, IntoConnectionInfo, aio::ConnectionManager};
use stagecraft_core::store::{StoreError, StoreResult};
use tracing::{info, warn};

use super::{Db, Library, store_error};

/// How to find the primary.
#[derive(Debug, Clone)]
pub struct SentinelOptions {
    /// `host:port` of each sentinel.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub master: String,
}

/// The current primary: where it is, the connection to it, and the fence floor its epoch gives.
#[derive(Clone)]
pub(crate) struct Current {
    pub(crate) client: Client,
    pub(crate) conn: ConnectionManager,
    /// `host:port`, for logs and to notice a change.
    pub(crate) addr: String,
    pub(crate) epoch: i64,
}

pub(crate) struct Primary {
    current: RwLock<Current>,
    sentinel: Option<(SentinelOptions, redis::ConnectionInfo)>,
    /// Wakes the follower at once (a command failed: maybe the primary moved).
    nudge: tokio::sync::Notify,
}

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
}

/// A connection to one server.
async fn connect(client: &Client) -> StoreResult<ConnectionManager> {
    ConnectionManager::new_with_config(client.clone(), manager_config())
        .await
        .db()
}

/// How `REDIS_URL` reaches its server, for the sentinels too: `None` without TLS, otherwise
/// whether the certificate's name goes unchecked (`rediss://…/#insecure`).
fn tls_of(template: &redis::ConnectionInfo) -> Option<bool> {
    match template.addr() {
        ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
        _ => None,
    }
}

/// A sentinel's URL, over TLS when `REDIS_URL` is.
fn sentinel_url(sentinel: &str, tls: Option<bool>) -> String {
    match tls {
        None => format!("redis://{sentinel}"),
        Some(false) => format!("rediss://{sentinel}"),
        Some(true) => format!("rediss://{sentinel}/#insecure"),
    }
}

/// `template` (its password, database and TLS settings) pointed at `host:port`.
fn pointed_at(template: &redis::ConnectionInfo, host: &str, port: u16) -> redis::ConnectionInfo {
    let addr = match template.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    template.clone().set_addr(addr)
}

/// What one sentinel says of `master`: its address and configuration epoch, unless it
/// considers it down.
async fn ask_sentinel(
    sentinel: &str,
    master: &str,
    tls: Option<bool>,
) -> Option<(String, u16, i64)> {
    let client = Client::open(sentinel_url(sentinel, tls)).ok()?;
    let asked = async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let fields: Vec<String> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(master)
            .query_async(&mut conn)
            .await
            .ok()?;
        let field = |name: &str| {
            fields
                .chunks_exact(2)
                .find(|pair| pair[0] == name)
                .map(|pair| pair[1].clone())
        };
        let flags = field("flags").unwrap_or_default();
        if flags.contains("o_down") || flags.contains("s_down") {
            return None;
        }
        Some((
            field("ip")?,
            field("port")?.parse().ok()?,
            field("config-epoch")?.parse().ok()?,
        ))
    };
    tokio::time::timeout(Duration::from_secs(1), asked)
        .await
        .ok()
        .flatten()
}

impl Primary {
    /// Connects to the primary (through the sentinels when given) and loads the library there.
    pub(crate) async fn open(
        url: &str,
        sentinel: Option<SentinelOptions>,
        library: &Library,
    ) -> StoreResult<Arc<Self>> {
        let template = url.into_connection_info().db()?;
        let sentinel = sentinel.map(|s| (s, template));
        let current = match &sentinel {
            None => {
                let client = Client::open(url).db()?;
                let conn = connect(&client).await?;
                let addr = client.get_connection_info().addr().to_string();
                Current {
                    client,
                    conn,
                    addr,
                    epoch: 0,
                }
            }
            Some((options, template)) => discover(options, template).await?.ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "no sentinel of {} names a reachable primary {:?}",
                    options.sentinels.join(","),
                    options.master
                ))
            })?,
        };
        let primary = Arc::new(Self {
            current: RwLock::new(current),
            sentinel,
            nudge: tokio::sync::Notify::new(),
        });
        if primary.sentinel.is_some() {
            tokio::spawn(follow(Arc::downgrade(&primary), library.clone()));
        }
        Ok(primary)
    }

    pub(crate) fn current(&self) -> Current {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.current().conn
    }

    /// The lowest fencing token a claim may grant now: above every token of earlier epochs.
    pub(crate) fn fence_floor(&self) -> i64 {
        self.current().epoch.saturating_mul(1 << 32)
    }

    /// Tells the follower a command failed in a way a moved primary would explain (an
    /// unreachable server, or one that is no longer the primary: `store_error` counts
    /// `READONLY` and `NOREPLICAS` answers as unavailable).
    pub(crate) fn suspect(&self, error: &StoreError) {
        if matches!(error, StoreError::Unavailable(_)) && self.sentinel.is_some() {
            self.nudge.notify_one();
        }
    }
}

/// The primary the sentinels name with the highest epoch: its host, port and epoch.
async fn ask_sentinels(options: &SentinelOptions, tls: Option<bool>) -> Option<(String, u16, i64)> {
    futures::future::join_all(
        options
            .sentinels
            .iter()
            .map(|s| ask_sentinel(s, &options.master, tls)),
    )
    .await
    .into_iter()
    .flatten()
    .max_by_key(|a| a.2)
}

/// The primary the sentinels name, connected and checked, or `None` when none names one that
/// answers as a primary.
async fn discover(
    options: &SentinelOptions,
    template: &redis::ConnectionInfo,
) -> StoreResult<Option<Current>> {
    match ask_sentinels(options, tls_of(template)).await {
        Some(named) => connect_named(template, named).await,
        None => Ok(None),
    }
}

/// A connection to the server a sentinel named, if it says it is a primary.
async fn connect_named(
    template: &redis::ConnectionInfo,
    (host, port, epoch): (String, u16, i64),
) -> StoreResult<Option<Current>> {
    let client = Client::open(pointed_at(template, &host, port)).db()?;
    let mut conn = connect(&client).await?;
    // A sentinel's view may lag: only a server that says it is a primary is one.
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.db()?;
    let is_master = matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
        || matches!(role.first(), Some(redis::Value::SimpleString(s)) if s == "master");
    if !is_master {
        return Ok(None);
    }
    Ok(Some(Current {
        client,
        conn,
        addr: format!("{host}:{port}"),
        epoch,
    }))
}

/// Asks the sentinels every second (at once when nudged) and, when they name another primary
/// or a later epoch, connects there and switches to it, with the library loaded there first,
/// until the store is dropped.
async fn follow(primary: Weak<Primary>, library: Library) {
    loop {
        let Some(strong) = primary.upgrade() else {
            return;
        };
        let Some((options, template)) = strong.sentinel.clone() else {
            return;
        };
        let seen = strong.current();
        drop(strong);
        let changed =
            ask_sentinels(&options, tls_of(&template))
                .await
                .filter(|(host, port, epoch)| {
                    format!("{host}:{port}") != seen.addr || *epoch > seen.epoch
                });
        let found = match changed {
            Some(named) => connect_named(&template, named).await,
            None => Ok(None),
        };
        match found {
            Ok(Some(mut found)) => {
                // A new primary may refuse writes (FUNCTION LOAD too) until a replica has caught
                // up with it (`min-replicas-to-write`): it is followed anyway, for reads at once,
                // and the first call that finds the library missing loads it.
                if let Err(error) = library.load(&mut found.conn).await {
                    info!(error = %store_error(error), primary = %found.addr, "the new primary does not take the function library yet; it is loaded on first use");
                }
                if let Some(strong) = primary.upgrade() {
                    info!(from = %seen.addr, to = %found.addr, epoch = found.epoch, "following the new Redis primary");
                    if let Ok(mut current) = strong.current.write() {
                        *current = found;
                    }
                }
            }
            Ok(_) => {}
            Err(error) => warn!(error = %error, "asking the sentinels for the primary failed"),
        }
        let Some(strong) = primary.upgrade() else {
            return;
        };
        let nudged = strong.nudge.notified();
        tokio::select! {
            () = nudged => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_a_sentinel_names_is_reached_as_the_url_says() {
        let tls = "rediss://:secret@cache:6380/2"
            .into_connection_info()
            .expect("a URL");
        assert_eq!(tls_of(&tls), Some(false));
        assert_eq!(sentinel_url("s1:26379", tls_of(&tls)), "rediss://s1:26379");
        let named = pointed_at(&tls, "10.0.0.5", 6381);
        assert!(matches!(
            named.addr(),
            ConnectionAddr::TcpTls { host, port: 6381, insecure: false, .. } if host == "10.0.0.5"
        ));
        assert_eq!(named.redis_settings().db(), 2);
        assert_eq!(named.redis_settings().password(), Some("secret"));
        let plain = "redis://cache:6379".into_connection_info().expect("a URL");
        assert_eq!(tls_of(&plain), None);
        assert_eq!(sentinel_url("s1:26379", None), "redis://s1:26379");
        let insecure = "rediss://cache:6380/#insecure"
            .into_connection_info()
            .expect("a URL");
        assert_eq!(
            sentinel_url("s1:26379", tls_of(&insecure)),
            "rediss://s1:26379/#insecure"
        );
        assert_eq!(
            pointed_at(&plain, "10.0.0.5", 6381).addr(),
            &ConnectionAddr::Tcp("10.0.0.5".to_owned(), 6381)
        );
    }
}
