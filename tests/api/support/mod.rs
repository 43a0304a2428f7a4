//! Test support: real processes and the Elasticsearch stand-in.
#![allow(dead_code)]

pub mod app;
pub mod data;
pub mod es;
pub mod es_standin;
pub mod load;
pub mod process;
pub mod proxy;
pub mod redis_cluster;
pub mod redis_server;
