//! The core's store conformance suite, on a fresh SQLite file per case.

use std::sync::Arc;

use stagecraft_core::{clock::SystemClock, testing::Fixture};
use stagecraft_store_sqlite::{SqliteStore, sqlite_url_for};

async fn open() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url_for(&dir.path().join("store.db"));
    let store = SqliteStore::open(&url, Arc::new(SystemClock))
        .await
        .expect("the store opens");
    Fixture {
        store: Arc::new(store),
        guard: Box::new(dir),
    }
}

stagecraft_core::store_conformance!(open);
