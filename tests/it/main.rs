//! Stagecraft's integration tests: real processes, a real SQLite file, the real HTTP server.

mod api;
mod console;
mod durability;
mod engine;
mod failover;
mod faults;
mod limits;
mod live;
mod objects;
mod packaging;
mod postgres;
mod redis_scale;
mod security;
mod studio;
mod support;
mod tls;
mod watch;
mod work_orders;
