//! Persistence plumbing shared by the services: the group-commit write pipeline.
pub mod pipeline;
