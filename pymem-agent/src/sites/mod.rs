//! Allocation sites: which Python lines hold the memory. Arenas and sampled
//! blocks carry the stack that allocated them; when they are freed their
//! bytes leave that stack again, so sites show memory still held.
mod grouping;
pub mod keys;
pub mod state;
mod tracker;

pub mod flamegraph;
pub mod pprof;

pub use self::{
    grouping::{Site, group_sites, location},
    tracker::{SiteTracker, StackBytes},
};
