//! placeholder until the auth crate lands
