//! OCI's own APIs, as ferry speaks them: request signing (`sign.rs`), the
//! OCI CLI's config profiles that hold the API key (`profile.rs`), and one
//! signed client of an endpoint (`client.rs`) that the Object Storage
//! destination (`store/oci.rs`) and the image import (`import`) share.
//!
//! Design choice: no OCI SDK. There is no official Rust one, and the
//! crates there are either sign too little (only `date (request-target)
//! host`, also for POSTs that need the body headers), read only PKCS#8
//! keys, or are AGPL (`../shared/OCI.md`, section 3.3, has the survey).
//! The scheme is small and Oracle publishes test vectors for it.

pub mod client;
pub mod profile;
pub mod sign;
