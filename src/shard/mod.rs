//! Sharding: the [`router`] sends each part to the shard that owns its id
//! (`hash(id) % shards`); each [`actor`] owns the partial documents of its ids.

pub mod actor;
pub mod router;

pub use actor::{ShardActor, ShardHandle};
pub use router::{Router, SubmitError};
