//! What to do about an error. Every error type of ferry says its [`Class`]
//! from its variant, and the code that decides (retry a part, try a job again
//! later, refuse a file, stop) asks for the class, never the message.

/// The three things ferry does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// May pass by itself (network, server errors, throttling, a full disk, a
    /// stop request): try again later, keeping what was done.
    Retry,
    /// This file is at fault (not an image OCI takes, unreadable, changed
    /// while read): refuse it with the reason and what to do; other files go
    /// on, and trying the same bytes again would not help.
    Refuse,
    /// Needs an operator (a configuration, a credential, a destination that
    /// answers no, a lock held by another daemon): this attempt ends, and
    /// ferry does not try it again by itself.
    Fatal,
}
