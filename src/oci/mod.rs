//! OCI's own APIs, as ferry will speak them: request signing (`sign.rs`) and
//! the OCI CLI's config profiles that hold the API key (`profile.rs`); the
//! Object Storage destination and the image import build on them (issues 14
//! and 15).
//!
//! Design choice: no OCI SDK. There is no official Rust one, and the
//! crates there are either sign too little (only `date (request-target)
//! host`, also for POSTs that need the body headers), read only PKCS#8
//! keys, or are AGPL (`../shared/OCI.md`, section 3.3, has the survey).
//! The scheme is small and Oracle publishes test vectors for it.

pub mod profile;
pub mod sign;
