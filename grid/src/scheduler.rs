//! The scheduler loop (filled in below).
