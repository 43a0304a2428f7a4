//! Sharding: the [`router`] sends each part to the shard that owns its id
//! (`hash(id) % shards`); each [`actor`] owns the partial documents of its ids, and its
//! [`recorder`] records the completions it decides in memory.

pub mod actor;
pub mod recorder;
pub mod router;

pub use actor::{ShardActor, ShardHandle};
pub use router::{Router, SubmitError};
