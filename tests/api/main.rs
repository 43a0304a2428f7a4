//! Integration tests: the real application on port 0, a real `redis-server` per test,
//! and the Elasticsearch stand-in (or a real cluster with `EMBEDJOIN_TEST_ES_URL`).

mod bad_input;
mod cli;
mod cluster;
mod dead_letters;
mod defaults;
mod durability;
mod end_to_end;
mod es_standin_contract;
mod instances;
mod interleavings;
mod operate;
mod overload;
mod reembedding;
mod semantics;
mod sink_contract;
mod state_contract;
mod support;
mod vector_encoding;
